"""Distillation data: training text (teacher-written from diverse prompts, user files) and the teacher's top-k cache.

The teacher runs once per token: its top-k log-probs are written to disk (raw .npy, no pickle, plus a JSON index)
under a key hashed from the teacher's weights and the token ids, and every epoch reads them back.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import dist as distmod
from .dist import Dist
from .domains import CHAT_PROMPTS, TEXT_STARTS
from .precision import autocast, checked

HELDOUT_FRACTION = 0.1  # the last 10% of pydoc topics (by key order) are the held-out evaluation text

def pydoc_split(heldout_fraction: float = HELDOUT_FRACTION) -> tuple[list[str], list[str]]:
    """(train texts, held-out texts) from CPython's pydoc topics, split by sorted key: held-out is the tail."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    cut = int(len(keys) * (1.0 - heldout_fraction))
    return [topics[k] for k in keys[:cut]], [topics[k] for k in keys[cut:]]


def read_texts(paths: Iterable[Path]) -> list[str]:
    return [Path(p).read_text(encoding="utf-8") for p in paths]


def pack(texts: Sequence[str], tokenizer, seq_len: int, eos_id: int | None) -> np.ndarray:
    """Token ids of the texts, each followed by eos, concatenated and cut into [n, seq_len] int32 rows.

    The tail that does not fill a row is dropped.
    """
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text).ids
        if eos_id is not None:
            ids.append(eos_id)
    n = len(ids) // seq_len
    return np.asarray(ids[: n * seq_len], dtype=np.int32).reshape(n, seq_len)


def synthetic_prompts(n: int, seed: int, chat: Callable[[str], str] | None = None) -> list[str]:
    """n training prompts: text starts from several domains and, given a chat renderer, chat prompts (half each)."""
    rng = np.random.default_rng(seed)
    n_chat = n // 2 if chat is not None else 0
    starts = [TEXT_STARTS[i] for i in rng.choice(len(TEXT_STARTS), size=n - n_chat)]
    chats = [chat(CHAT_PROMPTS[i]) for i in rng.choice(len(CHAT_PROMPTS), size=n_chat)]
    return [p for pair in zip(starts, chats) for p in pair] + starts[len(chats):]


NUCLEUS_CANDIDATES = 256  # top-p picks among this many most likely tokens (not a sort of the whole vocabulary)


def nucleus_processor(top_p: float, k: int = NUCLEUS_CANDIDATES):
    """A transformers LogitsProcessor: top-p over the k most likely tokens, with their probabilities under the
    whole softmax (a 262k vocabulary is never sorted); scores [B, V] -> scores with the rest at -inf."""
    from transformers import LogitsProcessor

    class Nucleus(LogitsProcessor):
        def __call__(self, input_ids, scores):
            top, idx = scores.topk(min(k, scores.shape[-1]), dim=-1)                      # [B, k], descending
            probs = (top - scores.logsumexp(-1, keepdim=True)).exp()                      # [B, k]
            before = probs.cumsum(-1) - probs                                             # mass above each
            top = top.masked_fill(before >= top_p, float("-inf"))                        # the first always stays
            return torch.full_like(scores, float("-inf")).scatter(-1, idx, top)

    return Nucleus()


@torch.no_grad()
def synthesize(model, tokenizer, n: int, new_tokens: int, *, seed: int = 0, batch: int = 16,
               temperature: float = 0.8, top_p: float = 0.95, pad_id: int = 0, eos_ids: Sequence[int] = (),
               chat: Callable[[str], str] | None = None, done: Sequence[str] = (),
               deadline: float | None = None) -> list[str]:
    """n texts written by the teacher: each prompt of synthetic_prompts() and up to `new_tokens` sampled tokens.

    A text ends before the teacher's first end-of-sequence token (pack() puts one back); special tokens of the
    chat template stay in the text, so the student learns the teacher's answers in their chat format.
    `done`: texts of an interrupted call, continued from there (each batch samples from its own seed, so the
    texts do not depend on where a call stopped). deadline: a time.perf_counter() after which no further batch
    starts (the texts so far are returned, at least one batch's).
    """
    from transformers import LogitsProcessorList

    prompts = synthetic_prompts(n, seed, chat)
    texts = list(done)
    stop = set(eos_ids)
    nucleus = LogitsProcessorList([nucleus_processor(top_p)])
    bar = tqdm(range(len(texts), n, batch), desc="teacher-written text", unit="batch")
    for start in bar:
        if deadline is not None and len(texts) > 0 and time.perf_counter() > deadline:
            bar.close()
            break
        torch.manual_seed(seed * 1_000_003 + start)
        ids, mask = _left_pad([tokenizer.encode(p).ids for p in prompts[start:start + batch]], pad_id)
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=1.0,
                             top_k=0, logits_processor=nucleus, max_new_tokens=new_tokens, pad_token_id=pad_id,
                             eos_token_id=list(stop) or None)
        for row, row_mask in zip(out.tolist(), mask):
            prompt, new = row[int((row_mask == 0).sum()):ids.shape[1]], row[ids.shape[1]:]
            cut = next((i for i, t in enumerate(new) if t in stop), len(new))
            texts.append(tokenizer.decode(prompt + new[:cut], skip_special_tokens=False))
    return texts


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T] ids and attention mask, padded on the left so that generation continues every row at once."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def fingerprint(model) -> str:
    """A hash of a torch model's parameters and buffers (names, shapes, bytes)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class TeacherCache:
    """Token rows and the teacher's top-k next-token log-probs for every position, memory-mapped from disk.

    tokens [n, T] int32; top_ids [n, T, k] int32; top_logp [n, T, k] float16, log-probs of the full softmax
    at temperature 1 (so exp(top_logp).sum(-1) <= 1; the rest is the mass outside the top k).
    """

    path: Path
    tokens: np.ndarray
    top_ids: np.ndarray
    top_logp: np.ndarray

    @property
    def k(self) -> int:
        return self.top_ids.shape[-1]

    def __len__(self) -> int:
        return self.tokens.shape[0]


def cache_key(teacher_fp: str, tokens: np.ndarray, k: int, precision: str = "fp32") -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{teacher_fp}|k={k}|shape={tokens.shape}|".encode())
    if precision != "fp32":  # other targets: never mixed with (nor replacing) an fp32 cache
        h.update(f"precision={precision}|".encode())
    h.update(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
    return h.hexdigest()


def build_cache(teacher, tokens: np.ndarray, cache_root: Path, *, k: int = 64, batch: int = 4,
                teacher_fp: str | None = None, dist: Dist | None = None, precision: str = "fp32") -> TeacherCache:
    """Run the teacher over `tokens` [n, T] once and store its top-k log-probs; resumes a partial cache.

    precision "bf16" runs the teacher's forward under bf16 autocast (its matmuls in bf16, accumulated in fp32):
    faster where the hardware multiplies bf16 natively; its targets differ from fp32's by bf16 rounding only (the
    test bounds the gap), which is why they get their own cache key.

    Under torch.distributed every rank calls this with the same tokens: rank 0 creates the files, each rank
    computes its share of the row batches, and all return the complete cache. A row's "done" flag is set only
    after its data is on disk, so a crash at any world size redoes only unfinished rows.
    """
    d = dist or distmod.current()
    teacher_fp = teacher_fp or fingerprint(teacher)
    path = Path(cache_root) / cache_key(teacher_fp, tokens, k, checked(precision))
    index_file = path / "index.json"
    if d.main and not index_file.exists():
        _create(path, tokens, k, teacher_fp, precision)
    distmod.barrier(d)
    index = json.loads(index_file.read_text())
    if index["filled"] < index["rows"]:
        # every rank deals from the same unfinished rows: read before any rank marks one done
        todo = np.flatnonzero(np.load(path / "done.npy", allow_pickle=False) == 0)
        distmod.barrier(d)
        _fill(teacher, path, index, todo, batch, d, precision)
        distmod.barrier(d)
        if d.main:
            index["filled"] = int(np.load(path / "done.npy", allow_pickle=False).sum())
            index_file.write_text(json.dumps(index, indent=1))
        distmod.barrier(d)
    return load_cache(path)


def _create(path: Path, tokens: np.ndarray, k: int, teacher_fp: str, precision: str) -> None:
    """Empty cache files for tokens [n, T]: data, per-row done flags, then the index that marks them usable."""
    n, seq = tokens.shape
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "tokens.npy", np.ascontiguousarray(tokens, dtype=np.int32), allow_pickle=False)
    np.lib.format.open_memmap(path / "top_ids.npy", mode="w+", dtype=np.int32, shape=(n, seq, k)).flush()
    np.lib.format.open_memmap(path / "top_logp.npy", mode="w+", dtype=np.float16, shape=(n, seq, k)).flush()
    np.save(path / "done.npy", np.zeros(n, dtype=np.uint8), allow_pickle=False)
    index = {"teacher": teacher_fp, "k": k, "rows": n, "seq_len": seq, "filled": 0, "precision": precision}
    (path / "index.json").write_text(json.dumps(index, indent=1))


@torch.no_grad()
def _fill(teacher, path: Path, index: dict, todo: np.ndarray, batch: int, d: Dist, precision: str) -> None:
    """This rank's share of the unfinished rows `todo` (the same on every rank): batches of `batch` rows, dealt
    round-robin over the ranks."""
    tokens = np.load(path / "tokens.npy", allow_pickle=False)
    top_ids = np.load(path / "top_ids.npy", mmap_mode="r+", allow_pickle=False)
    top_logp = np.load(path / "top_logp.npy", mmap_mode="r+", allow_pickle=False)
    done = np.load(path / "done.npy", mmap_mode="r+", allow_pickle=False)
    mine = [todo[i:i + batch] for i in range(0, len(todo), batch)][d.rank::d.world]
    device = next(teacher.parameters()).device
    bar = tqdm(total=sum(map(len, mine)) * tokens.shape[1], desc="teacher top-k", unit="tok", unit_scale=True,
               disable=not d.main)
    for rows in mine:
        ids = torch.from_numpy(tokens[rows].astype(np.int64))  # [B, T]
        with autocast(precision, device):
            logits = teacher(input_ids=ids.to(device), use_cache=False).logits.float()  # [B, T, V]
        vals, idx = (t.cpu() for t in torch.topk(torch.log_softmax(logits, dim=-1), index["k"], dim=-1))
        top_ids[rows] = idx.numpy().astype(np.int32)  # [B, T, k]
        top_logp[rows] = vals.numpy().astype(np.float16)
        top_ids.flush()
        top_logp.flush()
        done[rows] = 1  # after the data: a crash only redoes work
        done.flush()
        bar.update(ids.numel())
    bar.close()


def load_cache(path: Path) -> TeacherCache:
    path = Path(path)
    index = json.loads((path / "index.json").read_text())
    if index["filled"] < index["rows"]:
        raise ValueError(f"teacher cache {path} is incomplete ({index['filled']}/{index['rows']} rows)")

    def load(name):
        return np.load(path / name, mmap_mode="r", allow_pickle=False)

    return TeacherCache(path, load("tokens.npy"), load("top_ids.npy"), load("top_logp.npy"))


def ngrams(rows: np.ndarray, n: int) -> set[bytes]:
    """Every contiguous n-token window of the rows [r, T] as bytes (for set membership)."""
    rows = np.ascontiguousarray(np.atleast_2d(rows), dtype=np.int32)
    if rows.shape[1] < n:
        return set()
    windows = np.lib.stride_tricks.sliding_window_view(rows, n, axis=1).reshape(-1, n)  # [r * (T-n+1), n]
    return {w.tobytes() for w in np.ascontiguousarray(windows)}


def overlapping_rows(rows: np.ndarray, heldout_ids: Sequence[int], n: int = 32) -> np.ndarray:
    """Boolean [r]: which rows share an n-token window with the held-out ids (so must not be trained on)."""
    held = ngrams(np.asarray(heldout_ids, dtype=np.int32)[None], n)
    return np.array([not held.isdisjoint(ngrams(row[None], n)) for row in rows], dtype=bool)
