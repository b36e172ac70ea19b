"""The built-in dataset: a deterministic generator of captioned sound events.

It stands in for AudioSet so that everything runs out of the box. Each 2 s clip
holds one to three events from EVENT_CLASSES, each with an attribute
("high-pitched", "fast", "long", ...) that is audible and visible on the log-mel
spectrogram; every class has its own spectro-temporal shape, and pitch, rate,
duration, level and timing vary within a class so that the task is not trivial.

Commands:
    python builtin_data.py render     # render the audio into the cache (train.py does it on first use)
    python builtin_data.py captions   # rewrite assets/builtin_*.csv and their embeddings
                                      # (needs the optional sentence-transformers extra)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

import data
import text_embed
from data import SAMPLE_RATE

# Determinism: a clip depends only on (seed, index). The plan and the captions
# come from random.Random(f"{seed}-{index}") and use nothing but
# Random.random(), whose sequence Python keeps across versions, so the committed
# caption embeddings (assets/builtin_*.npy) stay valid. The audio comes from
# numpy's default_rng seeded with an integer derived from (seed, index).

CLIP_SECONDS = 2.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)

EVENT_CLASSES: tuple[str, ...] = (
    "tone",                   # stationary sine: one horizontal line
    "rising chirp",           # exponential sine sweep up: rising line
    "falling chirp",          # exponential sine sweep down: falling line
    "warbling tone",          # sine with vibrato: wiggling line
    "pulsing tone",           # sine with deep tremolo: dashed line
    "bright harmonic note",   # sawtooth-like: all harmonics, dense stack
    "hollow harmonic note",   # square-like: odd harmonics only, gapped stack
    "bell",                   # inharmonic partials with exponential decay
    "white noise burst",      # flat broadband noise
    "pink noise burst",       # broadband noise tilted to low frequencies
    "hiss",                   # noise only above a few kHz
    "low rumble",             # brown noise below ~250 Hz
    "whoosh",                 # noise band whose centre sweeps up or down
    "click train",            # regular broadband vertical lines
    "knock",                  # few damped low resonances with a sharp attack
)

# The attribute words each class can carry; every word maps to a parameter
# range that is visibly different on the spectrogram (pitch, rate, length,
# envelope shape, sweep direction, number of hits).
EVENT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "tone": ("low-pitched", "mid-pitched", "high-pitched"),
    "rising chirp": ("slow", "fast"),
    "falling chirp": ("slow", "fast"),
    "warbling tone": ("slow", "fast"),
    "pulsing tone": ("slow", "fast"),
    "bright harmonic note": ("low-pitched", "mid-pitched", "high-pitched"),
    "hollow harmonic note": ("low-pitched", "mid-pitched", "high-pitched"),
    "bell": ("low-pitched", "high-pitched"),
    "white noise burst": ("short", "long"),
    "pink noise burst": ("swelling", "fading"),
    "hiss": ("short", "long"),
    "low rumble": ("short", "long"),
    "whoosh": ("upward", "downward"),
    "click train": ("slow", "fast"),
    "knock": ("single", "double", "triple"),
}


@dataclass(frozen=True)
class Event:
    """One planned sound event; all numbers come from the plan RNG.

    Fields a class does not use keep their zero default.
    """

    kind: str                        # one of EVENT_CLASSES
    attribute: str                   # one of EVENT_ATTRIBUTES[kind]
    start_s: float                   # onset within the clip
    duration_s: float                # length, at least 0.3 s
    freq_hz: float = 0.0             # pitch, start of a sweep, resonance, or noise band edge
    freq_end_hz: float = 0.0         # end frequency of a chirp or whoosh
    rate_hz: float = 0.0             # vibrato, tremolo or click rate
    vibrato_semitones: float = 0.0   # peak pitch deviation of a warbling tone
    decay_s: float = 0.0             # exponential decay time constant of bells and knocks
    hits: int = 0                    # number of knocks
    gain_db: float = 0.0             # level relative to the other events in the clip


# --- Planning (Python random, Random.random() only) ---

# Events stay this far from the clip edges so their fades are never cut.
_EDGE_MARGIN_S = 0.05
_USABLE_S = CLIP_SECONDS - 2 * _EDGE_MARGIN_S
_MAX_EVENTS = 3
# Chance that an event starts slightly before the previous one ends, and by how much.
_OVERLAP_PROBABILITY = 0.2
_OVERLAP_RANGE_S = (0.02, 0.08)

# Duration ranges (s). Every lower bound is at most 0.6 s, so three events
# always fit into the 1.9 s usable span; the budgeted allocation relies on it.
_DEFAULT_DURATION_S = (0.35, 0.8)
_SHORT_DURATION_S = (0.3, 0.4)
_LONG_DURATION_S = (0.6, 1.1)
# Modulated classes need a few modulation periods to show their shape.
_MODULATED_DURATION_S = (0.55, 0.95)
_SWEEP_DURATION_S = (0.4, 0.8)
_DECAYING_DURATION_S = (0.45, 0.9)
_KNOCK_DURATION_S = {"single": (0.3, 0.35), "double": (0.35, 0.55), "triple": (0.5, 0.7)}
_KNOCK_HITS = {"single": 1, "double": 2, "triple": 3}
# Ring-out time kept after the last knock.
_KNOCK_TAIL_S = 0.2

# Pitch ranges per attribute, with gaps between them so the words are learnable.
_TONE_PITCH_HZ = {"low-pitched": (150.0, 300.0), "mid-pitched": (450.0, 1000.0),
                  "high-pitched": (1800.0, 4500.0)}
_NOTE_PITCH_HZ = {"low-pitched": (100.0, 160.0), "mid-pitched": (200.0, 350.0),
                  "high-pitched": (450.0, 800.0)}
_BELL_PITCH_HZ = {"low-pitched": (250.0, 450.0), "high-pitched": (800.0, 1400.0)}
# Sweep slope in octaves per second; all sweeps stay inside this band.
_CHIRP_SLOPE_OCT_PER_S = {"slow": (1.5, 2.5), "fast": (4.5, 7.0)}
_CHIRP_BAND_HZ = (120.0, 6500.0)
_VIBRATO_RATE_HZ = {"slow": (3.0, 4.5), "fast": (7.0, 10.0)}
_TREMOLO_RATE_HZ = {"slow": (3.5, 5.0), "fast": (9.0, 14.0)}
_CLICK_RATE_HZ = {"slow": (5.0, 8.0), "fast": (16.0, 25.0)}
_EVENT_GAIN_DB = (-6.0, 0.0)


def _uniform(rng: random.Random, low: float, high: float) -> float:
    return low + (high - low) * rng.random()


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    """Uniform on a log scale, matching how pitch is perceived and mel-spaced."""
    return math.exp(_uniform(rng, math.log(low), math.log(high)))


def _randbelow(rng: random.Random, n: int) -> int:
    # min() guards against the (theoretical) float rounding up to n.
    return min(int(rng.random() * n), n - 1)


def _choice(rng: random.Random, items):
    return items[_randbelow(rng, len(items))]


def _sample_distinct(rng: random.Random, items, k: int) -> list:
    """k distinct items in random order (partial Fisher-Yates on a copy)."""
    pool = list(items)
    for i in range(k):
        j = i + _randbelow(rng, len(pool) - i)
        pool[i], pool[j] = pool[j], pool[i]
    return pool[:k]


def _duration_range_s(kind: str, attribute: str) -> tuple[float, float]:
    if attribute == "short":
        return _SHORT_DURATION_S
    if attribute == "long":
        return _LONG_DURATION_S
    if kind == "knock":
        return _KNOCK_DURATION_S[attribute]
    if kind in ("warbling tone", "pulsing tone", "click train"):
        return _MODULATED_DURATION_S
    if kind in ("rising chirp", "falling chirp"):
        return _SWEEP_DURATION_S
    if kind in ("bell", "pink noise burst", "whoosh"):
        return _DECAYING_DURATION_S
    return _DEFAULT_DURATION_S


def _allocate_durations_s(ranges: list[tuple[float, float]], rng: random.Random) -> list[float]:
    """Draw one duration per range so that their sum fits into the usable span.

    Each draw is capped so that the events still to be drawn can get their
    minimum; visiting the events in random order spreads the cap's effect.
    Durations are floored to whole milliseconds, which keeps them >= the
    (millisecond-valued) lower bounds.
    """
    durations_s = [0.0] * len(ranges)
    pending = set(range(len(ranges)))
    used_s = 0.0
    for i in _sample_distinct(rng, range(len(ranges)), len(ranges)):
        pending.discard(i)
        low_s, high_s = ranges[i]
        reserved_s = sum(ranges[j][0] for j in pending)
        cap_s = min(high_s, _USABLE_S - used_s - reserved_s)
        durations_s[i] = math.floor(_uniform(rng, low_s, cap_s) * 1000.0) / 1000.0
        used_s += durations_s[i]
    return durations_s


def _plan_parameters(kind: str, attribute: str, duration_s: float, rng: random.Random) -> dict:
    """The class-specific numeric parameters of one event."""
    if kind == "tone":
        return {"freq_hz": _log_uniform(rng, *_TONE_PITCH_HZ[attribute])}
    if kind in ("rising chirp", "falling chirp"):
        span_oct = _uniform(rng, *_CHIRP_SLOPE_OCT_PER_S[attribute]) * duration_s
        low_hz = _log_uniform(rng, _CHIRP_BAND_HZ[0], _CHIRP_BAND_HZ[1] / 2.0 ** span_oct)
        high_hz = low_hz * 2.0 ** span_oct
        if kind == "rising chirp":
            return {"freq_hz": low_hz, "freq_end_hz": high_hz}
        return {"freq_hz": high_hz, "freq_end_hz": low_hz}
    if kind == "warbling tone":
        return {"freq_hz": _log_uniform(rng, 350.0, 2500.0),
                "rate_hz": _uniform(rng, *_VIBRATO_RATE_HZ[attribute]),
                "vibrato_semitones": _uniform(rng, 1.5, 3.0)}
    if kind == "pulsing tone":
        return {"freq_hz": _log_uniform(rng, 300.0, 3000.0),
                "rate_hz": _uniform(rng, *_TREMOLO_RATE_HZ[attribute])}
    if kind in ("bright harmonic note", "hollow harmonic note"):
        return {"freq_hz": _log_uniform(rng, *_NOTE_PITCH_HZ[attribute])}
    if kind == "bell":
        return {"freq_hz": _log_uniform(rng, *_BELL_PITCH_HZ[attribute]),
                "decay_s": _uniform(rng, 0.15, 0.35)}
    if kind == "hiss":
        # Lower edge of the noise band.
        return {"freq_hz": _uniform(rng, 3000.0, 4500.0)}
    if kind == "low rumble":
        # Upper edge of the noise band.
        return {"freq_hz": _uniform(rng, 150.0, 300.0)}
    if kind == "whoosh":
        low_hz = _log_uniform(rng, 250.0, 600.0)
        high_hz = _log_uniform(rng, 2500.0, 5000.0)
        if attribute == "upward":
            return {"freq_hz": low_hz, "freq_end_hz": high_hz}
        return {"freq_hz": high_hz, "freq_end_hz": low_hz}
    if kind == "click train":
        return {"rate_hz": _uniform(rng, *_CLICK_RATE_HZ[attribute])}
    if kind == "knock":
        return {"freq_hz": _log_uniform(rng, 150.0, 600.0),
                "decay_s": _uniform(rng, 0.015, 0.035),
                "hits": _KNOCK_HITS[attribute]}
    # White and pink noise bursts need no numbers beyond duration and envelope.
    return {}


def plan_clip(rng: random.Random) -> list[Event]:
    """Plan 1 to 3 events of distinct classes, in time order, inside the clip.

    Events do not overlap, except that a later one may start up to 80 ms
    before the previous one ends. Every event lasts at least 0.3 s.
    """
    n_events = 1 + _randbelow(rng, _MAX_EVENTS)
    # Distinct classes per clip keep the order in the captions unambiguous
    # and the class counts balanced.
    kinds = _sample_distinct(rng, EVENT_CLASSES, n_events)
    attributes = [_choice(rng, EVENT_ATTRIBUTES[kind]) for kind in kinds]
    durations_s = _allocate_durations_s(
        [_duration_range_s(k, a) for k, a in zip(kinds, attributes)], rng)

    # Share the spare time randomly between the lead-in, the gaps and the tail.
    slack_s = _USABLE_S - sum(durations_s)
    weights = [rng.random() for _ in range(n_events + 1)]
    weight_total = sum(weights) or 1.0
    shares_s = [slack_s * w / weight_total for w in weights]

    events = []
    cursor_s = _EDGE_MARGIN_S + shares_s[0]
    for i, (kind, attribute, duration_s) in enumerate(zip(kinds, attributes, durations_s)):
        if i > 0:
            if rng.random() < _OVERLAP_PROBABILITY:
                # Overlap instead of a gap; the unused share lengthens the tail.
                cursor_s -= _uniform(rng, *_OVERLAP_RANGE_S)
            else:
                cursor_s += shares_s[i]
        start_s = round(cursor_s, 3)
        params = _plan_parameters(kind, attribute, duration_s, rng)
        events.append(Event(kind=kind, attribute=attribute, start_s=start_s,
                            duration_s=duration_s,
                            gain_db=_uniform(rng, *_EVENT_GAIN_DB), **params))
        cursor_s = start_s + duration_s
    return events


# --- Captions (Python random, Random.random() only) ---

# Several phrasings per event count, imitating different caption writers.
# {a}, {b}, {c} are the events in time order; {A} etc. are capitalised.
_CAPTION_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: (
        "{A}.",
        "One sound: {a}.",
        "There is {a}.",
        "{A} is heard.",
        "We hear {a}.",
        "The clip contains {a}.",
        "Just {a}.",
    ),
    2: (
        "{A}, then {b}.",
        "{B} follows {a}.",
        "Two sounds: {a} and then {b}.",
        "First {a}, then {b}.",
        "{A} followed by {b}.",
        "{B} comes after {a}.",
        "There are two sounds, {a} and {b}, in that order.",
        "{A} is heard before {b}.",
    ),
    3: (
        "{A}, then {b}, then {c}.",
        "First {a}, then {b}, and finally {c}.",
        "Three sounds: {a}, {b} and {c}, in that order.",
        "{A} followed by {b} and then {c}.",
        "There are three sounds: first {a}, then {b}, and last {c}.",
        "{A}, {b}, and {c}, one after another.",
        "{A} starts the clip, {b} follows, and {c} ends it.",
    ),
}


def _event_phrase(event: Event) -> str:
    """E.g. "a high-pitched tone", "an upward whoosh"."""
    words = f"{event.attribute} {event.kind}"
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def caption_clip(events: list[Event], rng: random.Random, n_captions: int = 2) -> list[str]:
    """n_captions different captions naming the events, attributes and order.

    Each caption uses a different template, so the captions are distinct.
    Raises ValueError if more captions are asked for than templates exist.
    """
    templates = _CAPTION_TEMPLATES.get(len(events))
    if templates is None:
        raise ValueError(f"captions need 1 to {_MAX_EVENTS} events, got {len(events)}")
    if not 1 <= n_captions <= len(templates):
        raise ValueError(f"n_captions must be in 1..{len(templates)} for "
                         f"{len(events)} event(s), got {n_captions}")
    phrases = [_event_phrase(e) for e in events]
    fields = {}
    for name, phrase in zip("abc", phrases):
        fields[name] = phrase
        fields[name.upper()] = _capitalise(phrase)
    return [_capitalise(template.format(**fields))
            for template in _sample_distinct(rng, templates, n_captions)]


# --- Rendering (numpy) ---

# Harmonics of notes stop here, safely below the 8 kHz Nyquist frequency.
_MAX_PARTIAL_HZ = 7500.0
_BELL_PARTIAL_RATIOS = (1.0, 2.76, 5.40, 8.93)  # free bar / glockenspiel-like
_BELL_PARTIAL_AMPS = (1.0, 0.6, 0.4, 0.25)
_KNOCK_MODE_RATIOS = (1.0, 2.32)
_KNOCK_MODE_AMPS = (1.0, 0.5)
_KNOCK_HIT_AMPS = (1.0, 0.8, 0.65)
_KNOCK_TRANSIENT_AMP = 0.3
_CLICK_LENGTH_S = 0.003
_WAVETABLE_SIZE = 4096
_FADE_IN_S = 0.01
_FADE_OUT_S = 0.02
_NOTE_ATTACK_S = 0.015
_BELL_ATTACK_S = 0.003
_SUSTAINED_RMS = 0.25      # level of sustained events before mixing
_IMPULSIVE_PEAK = 0.9      # level of percussive events before mixing
_IMPULSIVE_KINDS = ("bell", "click train", "knock")
_NOISE_FLOOR_RMS = 1e-3    # -60 dBFS, so log-mel never sees log(0)
_MIX_PEAK_RANGE = (0.5, 0.9)
_SWELL_RANGE_DB = 30.0
_WHOOSH_FRAME = 512        # 32 ms frames for the time-varying noise band
_WHOOSH_BANDWIDTH_OCT = 0.25


def _time_s(n_samples: int) -> np.ndarray:
    return np.arange(n_samples) / SAMPLE_RATE


def _fade_envelope(n_samples: int, fade_in_s: float, fade_out_s: float) -> np.ndarray:
    """Raised-cosine ramps at both ends, so segments start and end at zero."""
    envelope = np.ones(n_samples)
    for n_ramp, at_start in ((int(fade_in_s * SAMPLE_RATE), True),
                             (int(fade_out_s * SAMPLE_RATE), False)):
        n_ramp = min(n_ramp, n_samples // 2)
        if n_ramp == 0:
            continue
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(n_ramp) / n_ramp)
        if at_start:
            envelope[:n_ramp] *= ramp
        else:
            envelope[-n_ramp:] *= ramp[::-1]
    return envelope


def _sine_from_freq_track(freq_hz: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sine whose instantaneous frequency follows freq_hz, random start phase."""
    phase_rad = 2.0 * np.pi * np.cumsum(freq_hz) / SAMPLE_RATE
    return np.sin(phase_rad + rng.uniform(0.0, 2.0 * np.pi))


def _spectrally_shaped_noise(n_samples: int, gain_fn, rng: np.random.Generator) -> np.ndarray:
    """White noise filtered in the frequency domain by gain_fn(freq_hz) -> amplitude gain."""
    spectrum = np.fft.rfft(rng.standard_normal(n_samples))
    freqs_hz = np.fft.rfftfreq(n_samples, 1.0 / SAMPLE_RATE)
    return np.fft.irfft(spectrum * gain_fn(freqs_hz), n_samples)


def _smooth_step(x: np.ndarray, edge0: float, edge1: float) -> np.ndarray:
    """0 below edge0, 1 above edge1, smooth in between (soft filter edges)."""
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _harmonic_note(event: Event, n_samples: int, odd_only: bool,
                   rng: np.random.Generator) -> np.ndarray:
    """Band-limited sawtooth (all harmonics) or square (odd harmonics) note.

    One period is summed into a wavetable and read with linear interpolation,
    which is much cheaper than one sine per harmonic per sample; only
    harmonics below _MAX_PARTIAL_HZ enter the table, so nothing aliases.
    """
    n_harmonics = int(_MAX_PARTIAL_HZ // event.freq_hz)
    orders = np.arange(1, n_harmonics + 1)
    if odd_only:
        orders = orders[orders % 2 == 1]
    table_phase = np.arange(_WAVETABLE_SIZE + 1) / _WAVETABLE_SIZE
    table = (np.sin(2.0 * np.pi * np.outer(table_phase, orders)) / orders).sum(axis=1)
    cycles = event.freq_hz * _time_s(n_samples) + rng.uniform()
    wave = np.interp((cycles % 1.0) * _WAVETABLE_SIZE, np.arange(_WAVETABLE_SIZE + 1), table)
    return wave * _fade_envelope(n_samples, _NOTE_ATTACK_S, 0.0)


def _bell(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Inharmonic partials struck at once; higher partials die away faster."""
    t_s = _time_s(n_samples)
    wave = np.zeros(n_samples)
    for i, (ratio, amp) in enumerate(zip(_BELL_PARTIAL_RATIOS, _BELL_PARTIAL_AMPS)):
        partial_hz = event.freq_hz * ratio
        if partial_hz >= _MAX_PARTIAL_HZ:
            break
        decay_s = event.decay_s / (1.0 + 0.8 * i)
        wave += amp * np.exp(-t_s / decay_s) * np.sin(
            2.0 * np.pi * partial_hz * t_s + rng.uniform(0.0, 2.0 * np.pi))
    # A 3 ms attack avoids the broadband onset click that random start phases
    # would cause; that vertical line is reserved for knocks and click trains.
    return wave * _fade_envelope(n_samples, _BELL_ATTACK_S, 0.0)


def _whoosh(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Noise band, Gaussian on a log-frequency axis, whose centre glides log-linearly.

    Built by overlap-adding independent noise frames, each filtered around the
    centre frequency at its time; square-root Hann windows at 50 % overlap
    keep the noise power constant across frame joins.
    """
    hop = _WHOOSH_FRAME // 2
    n_frames = n_samples // hop + 2
    # Frame i is centred on output sample i * hop (the first hop is cut off below).
    frame_times_s = np.arange(n_frames) * hop / SAMPLE_RATE
    progress = np.clip(frame_times_s / event.duration_s, 0.0, 1.0)
    centre_hz = event.freq_hz * (event.freq_end_hz / event.freq_hz) ** progress
    freqs_hz = np.fft.rfftfreq(_WHOOSH_FRAME, 1.0 / SAMPLE_RATE)
    log_distance = np.log2(np.maximum(freqs_hz, 1.0)[None, :] / centre_hz[:, None])
    band_gain = np.exp(-0.5 * (log_distance / _WHOOSH_BANDWIDTH_OCT) ** 2)
    spectra = (rng.standard_normal(band_gain.shape)
               + 1j * rng.standard_normal(band_gain.shape)) * band_gain
    window = np.sqrt(0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(_WHOOSH_FRAME) / _WHOOSH_FRAME))
    frames = np.fft.irfft(spectra, _WHOOSH_FRAME, axis=1) * window
    out = np.zeros((n_frames + 1) * hop)
    for i in range(n_frames):
        out[i * hop:i * hop + _WHOOSH_FRAME] += frames[i]
    # A whoosh swells and fades as it passes by.
    return out[hop:hop + n_samples] * np.sin(np.pi * np.arange(n_samples) / n_samples)


def _click_train(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Short decaying broadband clicks at a regular rate, the first at onset."""
    n_click = int(_CLICK_LENGTH_S * SAMPLE_RATE)
    wave = np.zeros(n_samples)
    n_clicks = int((n_samples - n_click) / SAMPLE_RATE * event.rate_hz) + 1
    for k in range(n_clicks):
        # Floor, not round, so the last click always fits.
        start = int(k * SAMPLE_RATE / event.rate_hz)
        click = rng.standard_normal(n_click) * np.exp(-np.arange(n_click) / (n_click / 3))
        wave[start:start + n_click] += click
    return wave


def _knock(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Evenly spaced hits, each two damped low modes plus a faint broadband tick."""
    t_s = _time_s(n_samples)
    spacing_s = ((event.duration_s - _KNOCK_TAIL_S) / (event.hits - 1)
                 if event.hits > 1 else 0.0)
    n_tick = int(0.003 * SAMPLE_RATE)
    wave = np.zeros(n_samples)
    for k in range(event.hits):
        start = int(round(k * spacing_s * SAMPLE_RATE))
        local_s = t_s[:n_samples - start]
        hit = np.zeros(local_s.size)
        for ratio, amp in zip(_KNOCK_MODE_RATIOS, _KNOCK_MODE_AMPS):
            hit += amp * np.sin(2.0 * np.pi * event.freq_hz * ratio * local_s)
        hit *= np.exp(-local_s / event.decay_s)
        hit[:n_tick] += (_KNOCK_TRANSIENT_AMP * rng.standard_normal(n_tick)
                         * np.exp(-np.arange(n_tick) / (n_tick / 4)))
        wave[start:] += _KNOCK_HIT_AMPS[k] * hit
    return wave


def _synthesise(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """The raw (unscaled, unfaded) waveform of one event."""
    kind = event.kind
    t_s = _time_s(n_samples)
    if kind == "tone":
        return _sine_from_freq_track(np.full(n_samples, event.freq_hz), rng)
    if kind in ("rising chirp", "falling chirp"):
        # Exponential sweep: a straight line on the (roughly log) mel axis.
        track_hz = event.freq_hz * (event.freq_end_hz / event.freq_hz) ** (t_s / event.duration_s)
        return _sine_from_freq_track(track_hz, rng)
    if kind == "warbling tone":
        deviation = event.vibrato_semitones / 12.0 * np.sin(2.0 * np.pi * event.rate_hz * t_s)
        return _sine_from_freq_track(event.freq_hz * 2.0 ** deviation, rng)
    if kind == "pulsing tone":
        # Squared raised cosine: deep silent gaps between pulses, starting from zero.
        tremolo = (0.5 - 0.5 * np.cos(2.0 * np.pi * event.rate_hz * t_s)) ** 2
        return tremolo * _sine_from_freq_track(np.full(n_samples, event.freq_hz), rng)
    if kind == "bright harmonic note":
        return _harmonic_note(event, n_samples, odd_only=False, rng=rng)
    if kind == "hollow harmonic note":
        return _harmonic_note(event, n_samples, odd_only=True, rng=rng)
    if kind == "bell":
        return _bell(event, n_samples, rng)
    if kind == "white noise burst":
        return rng.standard_normal(n_samples)
    if kind == "pink noise burst":
        # Amplitude ~ f^-1/2 (power ~ 1/f), flattened below 50 Hz.
        noise = _spectrally_shaped_noise(
            n_samples, lambda f: 1.0 / np.sqrt(np.maximum(f, 50.0)), rng)
        ramp_db = _SWELL_RANGE_DB * (t_s / event.duration_s - 1.0)
        if event.attribute == "fading":
            ramp_db = ramp_db[::-1]
        return noise * 10.0 ** (ramp_db / 20.0)
    if kind == "hiss":
        edge_hz = event.freq_hz
        return _spectrally_shaped_noise(
            n_samples, lambda f: _smooth_step(f, edge_hz - 500.0, edge_hz), rng)
    if kind == "low rumble":
        # Brown noise (amplitude ~ 1/f) cut off softly above the band edge, and
        # below 50 Hz too: the log-mel front end starts there, so energy below
        # it would be invisible yet still count in the level normalisation.
        edge_hz = event.freq_hz
        return _spectrally_shaped_noise(
            n_samples,
            lambda f: (_smooth_step(f, 30.0, 50.0) / np.maximum(f, 30.0)
                       * (1.0 - _smooth_step(f, edge_hz, 1.5 * edge_hz))),
            rng)
    if kind == "whoosh":
        return _whoosh(event, n_samples, rng)
    if kind == "click train":
        return _click_train(event, n_samples, rng)
    if kind == "knock":
        return _knock(event, n_samples, rng)
    raise ValueError(f"unknown event kind {kind!r}")


def _render_event(event: Event, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Synthesise, normalise, fade and apply the event gain."""
    wave = _synthesise(event, n_samples, rng)
    if event.kind in _IMPULSIVE_KINDS:
        # RMS would be dominated by silence between hits; match peaks instead.
        wave *= _IMPULSIVE_PEAK / max(np.max(np.abs(wave)), 1e-12)
        # Percussive attacks are intentional, so only the end is faded.
        wave *= _fade_envelope(n_samples, 0.0, _FADE_OUT_S)
    else:
        wave *= _SUSTAINED_RMS / max(np.sqrt(np.mean(wave ** 2)), 1e-12)
        wave *= _fade_envelope(n_samples, _FADE_IN_S, _FADE_OUT_S)
    return wave * 10.0 ** (event.gain_db / 20.0)


def render_clip(events: list[Event], seed: int) -> np.ndarray:
    """Render planned events into a float32 clip of CLIP_SAMPLES samples.

    The events are mixed at their planned positions and gains, the mix is
    scaled to a random peak in [0.5, 0.9], and a -60 dBFS white noise floor
    is added so that no log-mel bin is ever log(0).
    """
    rng = np.random.default_rng(seed)
    mix = np.zeros(CLIP_SAMPLES)
    for event in events:
        start = int(round(event.start_s * SAMPLE_RATE))
        n_samples = min(int(round(event.duration_s * SAMPLE_RATE)), CLIP_SAMPLES - start)
        mix[start:start + n_samples] += _render_event(event, n_samples, rng)
    peak = np.max(np.abs(mix))
    if peak > 0.0:
        mix *= rng.uniform(*_MIX_PEAK_RANGE) / peak
    mix += _NOISE_FLOOR_RMS * rng.standard_normal(CLIP_SAMPLES)
    return np.clip(mix, -1.0, 1.0).astype(np.float32)


# --- Public entry points ---

def describe_clip(index: int, seed: int = 0) -> tuple[list[Event], list[str]]:
    """The events and captions of clip `index`, without rendering audio.

    Plan and captions come from one random.Random(f"{seed}-{index}") (captions
    drawn after planning), so captions never depend on numpy.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got {index}, {seed}")
    rng = random.Random(f"{seed}-{index}")
    events = plan_clip(rng)
    return events, caption_clip(events, rng)


def make_clip(index: int, seed: int = 0) -> tuple[np.ndarray, list[Event], list[str]]:
    """Clip number `index` of the dataset with the given seed: (audio, events, captions).

    The audio seed seed * 1_000_003 + index is unique per clip for index < 1_000_003.
    """
    events, captions = describe_clip(index, seed)
    return render_clip(events, seed=seed * 1_000_003 + index), events, captions


def class_labels(events: list[Event]) -> list[str]:
    """The event classes present in the clip, in time order."""
    return [event.kind for event in events]


# --- The built-in dataset on disk ---

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
BUILTIN_VERSION = "v1"
BUILTIN_SEED = 0
# Clip indices of each split; no two splits share a clip. Pre-training sees train only; valid is for a
# downstream run to choose its epoch on clips that neither it nor the encoder was trained on (captioning), so
# that test stays unlooked-at.
BUILTIN_SPLITS = {"train": range(0, 1000), "valid": range(1250, 1500), "test": range(1000, 1250)}
# Stage 2.1 refines on a smaller "target domain" of the training clips: the
# first 300 clips with two or three events (longer, ordered captions).
BUILTIN_REFINE_CLIPS = 300


def builtin_cache_dir() -> Path:
    """Where the rendered audio lives: $M2D_CLAP_CACHE or ~/.cache/m2d-clap."""
    root = Path(os.environ.get("M2D_CLAP_CACHE", Path.home() / ".cache" / "m2d-clap"))
    return root / f"builtin-{BUILTIN_VERSION}"


def builtin_clip_indices(split: str) -> list[int]:
    """Clip indices of "train", "valid", "test" or "refine" (a subset of train)."""
    if split == "refine":
        multi = [i for i in BUILTIN_SPLITS["train"] if len(describe_clip(i, BUILTIN_SEED)[0]) >= 2]
        return multi[:BUILTIN_REFINE_CLIPS]
    if split not in BUILTIN_SPLITS:
        raise ValueError(f"unknown built-in split {split!r}; choose train, valid, test or refine")
    return list(BUILTIN_SPLITS[split])


def builtin_rows(split: str) -> list[dict]:
    """Caption rows (file_name, caption, label) of a built-in split, from the generator."""
    rows = []
    audio_split = "train" if split == "refine" else split
    for index in builtin_clip_indices(split):
        events, captions = describe_clip(index, BUILTIN_SEED)
        label = ";".join(class_labels(events))
        rows += [{"file_name": f"{audio_split}/{index:05d}.flac", "caption": c, "label": label}
                 for c in captions]
    return rows


def builtin_csv(split: str) -> Path:
    return ASSETS_DIR / f"builtin_{split}.csv"


def builtin_dataset(split: str = "train") -> tuple[Path, Path]:
    """(captions CSV, audio root) of a built-in split, rendering its audio on first use.

    The CSV and its sentence embeddings are committed; the audio is rendered
    once into the cache (about 1 s per 100 clips) and reused.
    """
    csv_path = builtin_csv(split)
    committed, _ = text_embed.read_captions_csv(csv_path)
    expected = [row["file_name"] for row in builtin_rows(split)]
    if committed != expected:
        raise RuntimeError(f"{csv_path} does not match the built-in generator; rewrite it and its "
                           "embeddings with 'python builtin_data.py captions'.")
    root = builtin_cache_dir()
    audio_split = "train" if split == "refine" else split
    done = root / f".{audio_split}-complete"
    if not done.exists():
        render_builtin_split(audio_split, root)
        done.touch()
    return csv_path, root


def builtin_eval_set() -> data.Manifest:
    """The built-in data as a manifest: train and test splits with event labels (several per clip), the test
    clips' captions and their sentence embeddings; the audio rendered on first use."""
    manifest = data.Manifest("built-in data", builtin_cache_dir(), split=[])
    for part in ("train", "test"):
        builtin_dataset(part)  # renders the audio on first use
        for row in builtin_rows(part):
            if row["file_name"] not in manifest.files[-1:]:  # a clip's caption rows are consecutive
                manifest.files.append(row["file_name"])
                manifest.labels.append(row["label"].split(";"))
                manifest.split.append(part)
    test = text_embed.load_caption_embeddings(builtin_csv("test"))
    clip_of = {name: k for k, name in enumerate(manifest.files)}
    manifest.captions = test.captions
    manifest.caption_clip = [clip_of[n] for n in test.file_names]
    manifest.caption_embeddings = test.embeddings
    return manifest


def builtin_caption_set() -> data.CaptionManifest:
    """The built-in data as a caption manifest: the 1,000 training, 250 valid and 250 test clips, 2 captions
    each, with their committed sentence embeddings (for the nearest-caption baseline); the audio rendered on first
    use. Pre-training never sees the valid clips, so they can choose a decoder's epoch as unseen clips would."""
    manifest = data.CaptionManifest("built-in data", builtin_cache_dir())
    embeddings = []
    for part in ("train", "valid", "test"):
        builtin_dataset(part)  # renders the audio on first use
        table = text_embed.load_caption_embeddings(builtin_csv(part))
        for name, caption in zip(table.file_names, table.captions):
            if name not in manifest.files[-1:]:  # a clip's caption rows are consecutive
                manifest.files.append(name)
                manifest.split.append(part)
                manifest.captions.append([])
            manifest.captions[-1].append(caption)
        embeddings.append(table.embeddings)
    manifest.caption_embeddings = np.concatenate(embeddings)
    return manifest


def render_builtin_split(split: str, root: Path):
    """Render every clip of a split as 16-bit FLAC under root/split/.

    The clips go to a folder of this process's own, renamed into place when
    complete: the split appears whole or not at all, also when several
    processes render it at once (the ranks of a first torchrun run).
    """
    tmp = root / f"{split}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    indices = BUILTIN_SPLITS[split]
    print(f"rendering the built-in {split} split ({len(indices)} clips) into {root / split}", flush=True)
    for index in indices:
        audio, _, _ = make_clip(index, BUILTIN_SEED)
        sf.write(tmp / f"{index:05d}.flac", audio, SAMPLE_RATE, subtype="PCM_16")
    try:
        tmp.rename(root / split)
    except OSError:  # another process put its complete copy there first
        shutil.rmtree(tmp)


def write_builtin_captions(model_name: str = text_embed.DEFAULT_MODEL):
    """Rewrite assets/builtin_{split}.csv and their sentence embeddings (.npy)."""
    ASSETS_DIR.mkdir(exist_ok=True)
    for split in (*BUILTIN_SPLITS, "refine"):
        csv_path = builtin_csv(split)
        with open(csv_path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "caption", "label"])
            writer.writeheader()
            writer.writerows(builtin_rows(split))
        text_embed.embed_captions_csv(csv_path, model_name=model_name, device="cpu")
        print(f"wrote {csv_path} and {csv_path.with_suffix('.npy')}")


def main(argv=None):
    p = argparse.ArgumentParser(description="The built-in dataset.")
    commands = p.add_subparsers(dest="command", required=True)
    commands.add_parser("render", help="render the built-in dataset's audio into the cache")
    captions = commands.add_parser("captions", help="rewrite assets/builtin_*.csv and their caption embeddings")
    captions.add_argument("--model", default=text_embed.DEFAULT_MODEL,
                          help="sentence model name or path (default: %(default)s)")
    args = p.parse_args(argv)
    if args.command == "render":
        for split in BUILTIN_SPLITS:
            csv_path, root = builtin_dataset(split)
            print(f"{split}: {csv_path} with audio under {root}")
    else:
        write_builtin_captions(args.model)


if __name__ == "__main__":
    main()
