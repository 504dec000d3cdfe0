"""Data with no data: the target writes the user turns too (Magpie, Xu et al., 2024), then answers them.

An aligned chat model given only its template's opening of a user turn (``<|im_start|>user\\n`` after the template's
default system prompt, for ChatML) completes it with a plausible request; sampled at temperature ~1 this yields varied
requests — explanations, lists, code, maths, plans — in the target's own distribution. Each request is then answered
greedily by the same target (as ``regenerate`` does), and with ``max_turns > 1`` the conversation continues: the target
writes a follow-up user turn after its own answer, and answers it.

Requests are de-duplicated (case- and whitespace-insensitive, and by their first words), requests that did not end on
their own (cut at ``max_query_tokens``) and very short ones are dropped, and so are requests equal to any prompt of the
``exclude`` files (held-out evaluation sets). A diversity report (distinct n-grams, length histograms, most common
first words) is written beside the output, and every record carries its provenance.

Crash safety as in ``regenerate``: finished rounds of batches are appended to ``<out>.partial`` (fsync'd) and a rerun continues
from the next round; the final file is written atomically.

    python cli.py synthesize --target smollm2-135m-instruct --out magpie.jsonl --num_samples 512
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spec_lightning.atomic import atomic_file
from spec_lightning.datagen.command import check_dtype, check_output, engine_writer, with_engine_arguments
from spec_lightning.datagen.engines import Engine, Sampling, VllmOptions, using_engine
from spec_lightning.datagen.jsonl import ResumableJsonl
from spec_lightning.datamodules.chat import prompt_ids
from spec_lightning.datamodules.sources import read_conversations

SYNTHESIS_VERSION = 1
# Batches per round (one crash-safe append). Requests are sampled batch by batch (batch b, turn t seeded with
# ``seed * 100003 + 97 b + t``: the same requests whatever the round size), then the round's kept requests are answered
# together in one engine call (vLLM keeps its batch full while answers of different lengths finish). Answers are
# greedy, so the conversations do not depend on the round size either.
ROUND_BATCHES = 8
SENTINEL = "MAGPIE_SENTINEL_7f3a"


@dataclass(frozen=True)
class SynthesisSettings:
    """Everything that changes the synthesized conversations (written into every record and into cache keys)."""

    num_samples: int = 512
    max_turns: int = 1
    query_temperature: float = 1.0
    query_top_p: float = 0.95
    max_query_tokens: int = 64
    min_query_chars: int = 12
    max_new_tokens: int = 128
    seed: int = 0
    dtype: str = "float32"
    request_openers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_turns < 1 or self.max_query_tokens < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_samples, max_turns, max_query_tokens and max_new_tokens must be >= 1: {self}")
        if self.query_temperature <= 0 or not 0 < self.query_top_p <= 1:
            raise ValueError(f"query_temperature must be > 0 and query_top_p in (0, 1]: {self}")
        if any(o != o.strip() for o in self.request_openers):
            raise ValueError(f"request_openers must not start or end with whitespace: {list(self.request_openers)}")
        check_dtype(self.dtype)

    def recorded(self) -> dict:
        """The settings as written into provenance and cache keys (JSON types; no ``request_openers`` when there are
        none, so plain Magpie sets, their partial files and cache keys read as they did before openers existed)."""
        out = {**asdict(self), "request_openers": list(self.request_openers)}
        if not out["request_openers"]:
            del out["request_openers"]
        return out


@dataclass
class SynthesisReport:
    out: str
    samples: int = 0
    resumed: int = 0
    batches: int = 0
    queries_sampled: int = 0
    dropped: dict = field(default_factory=dict)
    generated_tokens: int = 0
    seconds: float = 0.0
    diversity: dict = field(default_factory=dict)


def user_turn_prefix(tokenizer, history: list[dict]) -> str:
    """The text the chat template puts before a new user turn's content after ``history`` (Magpie's prompt)."""
    text = tokenizer.apply_chat_template(history + [{"role": "user", "content": SENTINEL}], tokenize=False,
                                         add_generation_prompt=False)
    if SENTINEL not in text:
        raise ValueError("the chat template does not render user content verbatim; cannot synthesize user turns")
    return text[: text.index(SENTINEL)]


def request_opener(openers: tuple[str, ...], batch: int, row: int, batch_size: int) -> str:
    """The words request ``row`` of batch ``batch`` is made to begin with ("" = a free Magpie request): the openers
    taken in turn over the requests' global order, so every batch mixes task types and any round size agrees."""
    return openers[(batch * batch_size + row) % len(openers)] if openers else ""


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def opening(text: str, words: int = 6) -> str:
    """The first ``words`` words (letters and digits only): requests that open alike are near-duplicates."""
    return " ".join(re.findall(r"\w+", text.lower())[:words])


def diversity(texts: list[str], tokenizer=None) -> dict:
    """Distinct-n (unique / total word n-grams, n = 1..3), a token-length histogram and the top first words."""
    out: dict = {"count": len(texts)}
    words = [normalise(t).split(" ") for t in texts if t.strip()]
    for n in (1, 2, 3):
        grams = [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]
        out[f"distinct_{n}"] = round(len(set(grams)) / max(len(grams), 1), 4)
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) if tokenizer else len(t.split()) for t in texts]
    bins = [0, 8, 16, 32, 64, 128, 256, 10**9]
    out["length_histogram"] = {f"{lo}-{hi if hi < 10**9 else 'inf'}": sum(lo <= n < hi for n in lengths)
                               for lo, hi in zip(bins, bins[1:], strict=False)}
    out["mean_length"] = round(sum(lengths) / max(len(lengths), 1), 1)
    out["top_first_words"] = dict(Counter(w[0] for w in words if w).most_common(10))
    return out


def _excluded(paths: list[str]) -> set[str]:
    found: set[str] = set()
    for path in paths:
        for conversation in read_conversations(path, require_assistant=False).conversations:
            found.update(normalise(m["content"]) for m in conversation["messages"] if m["role"] == "user")
    return found


@with_engine_arguments
def synthesize(
    target: str,
    out: str | Path,
    num_samples: int = 512,
    max_turns: int = 1,
    batch_size: int = 32,
    query_temperature: float = 1.0,
    query_top_p: float = 0.95,
    max_query_tokens: int = 64,
    min_query_chars: int = 12,
    max_new_tokens: int = 128,
    seed: int = 0,
    exclude: list[str] | None = None,
    max_batches: int | None = None,
    dtype: str = "float32",
    request_openers: list[str] | None = None,
    engine: str | None = None,
    server: str | None = None,
    device: str | None = None,
    vllm: VllmOptions = VllmOptions(),
    progress: bool = True,
    model=None,
    tokenizer=None,
    runner: Engine | None = None,
) -> SynthesisReport:
    """Synthesize ``num_samples`` conversations in which ``target`` writes both sides; JSONL with provenance to ``out``.

    Args:
        target: target source (builtin name, local HF directory, .gguf file or hub id).
        out: output ``.jsonl`` (``<out>.partial`` while running; ``<out>.report.json`` at the end).
        num_samples: conversations to keep after de-duplication and filtering.
        max_turns: user turns per conversation (follow-ups are written by the target after its own answers).
        batch_size: requests sampled together (one engine call, seeded per batch) and answers in flight together;
            a round (one crash-safe append) is up to ``ROUND_BATCHES`` batches, fewer when fewer conversations are
            still needed.
        query_temperature: sampling temperature of the user turns (answers are greedy).
        query_top_p: nucleus threshold of the user turns.
        max_query_tokens: a user turn that does not end within this many tokens is dropped.
        min_query_chars: shorter user turns are dropped.
        max_new_tokens: longest answer per turn.
        seed: sampling seed (batch b samples turn t with seed ``seed * 100003 + 97 b + t``).
        exclude: conversation files whose user turns must not appear (held-out evaluation prompts).
        max_batches: stop after this many batches even if fewer samples were kept.
        dtype: target dtype (float32, bfloat16 or float16).
        request_openers: task-type openers (e.g. "Explain", "Write a Python function"): the first user turn of
            request i begins with opener i mod len (its first words are written into the prompt, the target samples
            the rest), steering requests over task types that free Magpie sampling rarely opens with; "" entries
            leave a request free. None: every request free (plain Magpie).
    """
    settings = SynthesisSettings(num_samples, max_turns, query_temperature, query_top_p, max_query_tokens,
                                 min_query_chars, max_new_tokens, seed, dtype, tuple(request_openers or ()))
    out = check_output(out, batch_size)
    start = time.perf_counter()
    excluded = _excluded(list(exclude or []))
    report = SynthesisReport(out=str(out))
    with using_engine(runner, target, dtype, engine, server, device, vllm, batch_size, model, tokenizer) as runner:
        tokenizer = runner.tokenizer
        with engine_writer(out, target, runner, settings=settings.recorded(), version=SYNTHESIS_VERSION,
                           synthesized=True) as writer:
            run = _Run(settings, runner, batch_size, report, writer.done, excluded)
            _synthesize_rounds(run, writer, max_batches, progress, start)
            done = writer.finish()
    report.samples = len(done)
    report.dropped = dict(run.dropped)
    report.seconds = round(time.perf_counter() - start, 2)
    users = [m["content"] for r in done for m in r["messages"] if m["role"] == "user"]
    answers_text = [m["content"] for r in done for m in r["messages"] if m["role"] == "assistant"]
    report.diversity = {"user_turns": diversity(users, tokenizer), "assistant_turns": diversity(answers_text, tokenizer)}
    with atomic_file(out.with_suffix(".report.json")) as tmp:
        tmp.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


Key = tuple[int, int]  # (batch, row)


class _Run:
    """The state of one synthesis run: what is kept so far (for de-duplication) and the request counters."""

    def __init__(self, settings: SynthesisSettings, engine: Engine, batch_size: int, report: SynthesisReport,
                 done: list[dict], excluded: set[str]) -> None:
        self.settings, self.engine, self.tokenizer = settings, engine, engine.tokenizer
        self.ask = Sampling(settings.max_query_tokens, settings.query_temperature, settings.query_top_p)
        self.answer = Sampling(settings.max_new_tokens)  # greedy
        self.batch_size, self.report = batch_size, report
        report.resumed = len(done)
        self.done = done
        self.seen = {normalise(r["messages"][0]["content"]) for r in done} | set(excluded)
        self.openings = {opening(r["messages"][0]["content"]) for r in done}
        self.batch_index = 1 + max((r["provenance"]["batch"] for r in done), default=-1)
        self.openers_asked = self.openers_kept = 0
        self.dropped: Counter = Counter()

    def next_round_size(self, max_batches: int | None) -> int:
        """Batches in the next round: enough for the conversations still needed at the kept rate so far."""
        needed = self.settings.num_samples - len(self.done)
        kept_rate = max(0.25, self.openers_kept / self.openers_asked) if self.openers_asked else 1.0
        rounds = min(ROUND_BATCHES, math.ceil(needed / (kept_rate * self.batch_size)))
        return rounds if max_batches is None else min(rounds, max_batches - self.report.batches)

    def verdict(self, text: str, reason: str, turn: int) -> str | None:
        """Why a sampled user turn is dropped (None: kept)."""
        if reason != "stop":
            return "did not end"
        if len(text) < self.settings.min_query_chars:
            return "too short"
        if turn == 0 and (normalise(text) in self.seen or opening(text) in self.openings):
            return "duplicate"
        return None


def _synthesize_rounds(run: _Run, writer: ResumableJsonl, max_batches: int | None, progress: bool,
                       start: float) -> None:
    """Rounds of batches until ``num_samples`` conversations are kept (or ``max_batches`` were sampled)."""
    from tqdm.auto import tqdm

    report, num_samples = run.report, run.settings.num_samples
    bar = tqdm(total=num_samples, initial=len(writer.done), desc="synthesize", unit="conv", disable=not progress)
    while len(writer.done) < num_samples and (max_batches is None or report.batches < max_batches):
        rounds = run.next_round_size(max_batches)
        records = _synthesize_round(run, range(run.batch_index, run.batch_index + rounds))
        writer.append(records)
        bar.update(len(records))
        bar.set_postfix(tok_s=f"{report.generated_tokens / max(time.perf_counter() - start, 1e-9):.1f}")
        run.batch_index += rounds
        report.batches += rounds
    bar.close()


def _synthesize_round(run: _Run, batches: range) -> list[dict]:
    """The conversations of one round: every turn's user requests sampled batch by batch, then answered together."""
    keys = [(b, i) for b in batches for i in range(run.batch_size)]
    histories: dict[Key, list[dict]] = {k: [] for k in keys}
    reasons: dict[Key, list[str]] = {k: [] for k in keys}
    alive = keys
    for turn in range(run.settings.max_turns):
        kept = [k for b in batches for k in _ask_batch(run, [k for k in alive if k[0] == b], turn, histories)]
        if turn == 0:
            kept = _first_turn_kept(run, alive, kept, histories)
        if not kept:
            break
        answers = run.engine.generate([prompt_ids(run.tokenizer, histories[k]) for k in kept], run.answer, 0)
        for k, (ids, reason) in zip(kept, answers, strict=True):
            histories[k].append({"role": "assistant", "content": run.tokenizer.decode(ids, skip_special_tokens=True)})
            reasons[k].append(reason)
            run.report.generated_tokens += len(ids)
        alive = kept
    return [{"id": f"magpie-{b}-{i}", "messages": histories[b, i],
             "provenance": {"batch": b, "finish_reasons": reasons[b, i]}} for b, i in keys if histories[b, i]]


def _ask_batch(run: _Run, members: list[Key], turn: int, histories: dict[Key, list[dict]]) -> list[Key]:
    """Sample the user turn ``turn`` of one batch's conversations; the ones whose request is kept."""
    if not members:
        return []
    tokenizer, settings = run.tokenizer, run.settings
    openers = [request_opener(settings.request_openers, *k, run.batch_size) if turn == 0 else "" for k in members]
    prefixes = [tokenizer(user_turn_prefix(tokenizer, histories[k]) + o, add_special_tokens=False)["input_ids"]
                for k, o in zip(members, openers, strict=True)]
    queries = run.engine.generate(prefixes, run.ask, settings.seed * 100003 + members[0][0] * 97 + turn)
    run.report.queries_sampled += len(members)
    kept = []
    for k, o, (ids, reason) in zip(members, openers, queries, strict=True):
        # decoded with the opener's own tokens: a SentencePiece decode drops the leading space of a continuation
        # decoded alone ("Explain" + "how")
        lead = tokenizer(o, add_special_tokens=False)["input_ids"] if o else []
        text = tokenizer.decode(list(lead) + list(ids), skip_special_tokens=True).strip()
        why = run.verdict(text, reason, turn)
        if why:
            run.dropped[why] += 1
            continue
        if turn == 0:
            run.seen.add(normalise(text))
            run.openings.add(opening(text))
        histories[k].append({"role": "user", "content": text})
        kept.append(k)
    return kept


def _first_turn_kept(run: _Run, asked: list[Key], kept: list[Key], histories: dict[Key, list[dict]]) -> list[Key]:
    """Count the first turn's kept rate; answer only as many conversations as the set still needs."""
    run.openers_asked += len(asked)
    run.openers_kept += len(kept)
    needed = run.settings.num_samples - len(run.done)
    if len(kept) > needed:
        run.dropped["surplus"] += len(kept) - needed
        for k in kept[needed:]:
            histories[k] = []
        kept = kept[:needed]
    return kept


def main(args: list[str] | None = None) -> SynthesisReport:
    """``python cli.py synthesize ...``."""
    from spec_lightning.datagen.command import run_command

    return run_command(synthesize, "cli.py synthesize", __doc__.split("\n\n")[0], args)
