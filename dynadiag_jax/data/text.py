"""Language-model data: tokenizers (bytes, GPT-2 BPE) and token streams cut into windows.

Corpora: WikiText-103 from its raw files in a local directory, or, offline, the English
documentation shipped with every CPython (`pydoc_data.topics`). A split's token stream is cut
into non-overlapping windows of seq_len + 1 tokens; window i gives inputs = w[:-1] and
targets = w[1:]. The pipeline draws windows in a seeded order (pipeline.py).
"""

from __future__ import annotations

import array
import functools
import hashlib
import json
import logging
import os
from typing import Sequence

import numpy as np

from dynadiag_jax.data.errors import DataNotFoundError
from dynadiag_jax.data.source import Source

try:
  import regex as _re  # GPT-2's exact pattern needs \p{L} / \p{N}
  _GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
  EXACT_GPT2_PATTERN = True
except ImportError:  # approximation with `re`: letters [^\W\d_], numbers \d
  import re as _re
  _GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
  EXACT_GPT2_PATTERN = False

GPT2_FILES = ("vocab.json", "merges.txt")
GPT2_URL = "https://huggingface.co/openai-community/gpt2/resolve/main"
WIKITEXT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}
WIKITEXT_URL = "https://wikitext.smerity.com/wikitext-103-raw-v1.zip"


class ByteTokenizer:
  """UTF-8 bytes as tokens 0..255, plus EOS = 256 between documents."""

  vocab_size = 257
  eos_id = 256
  name = "bytes"

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 token ids."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Token ids -> str (EOS dropped, invalid UTF-8 replaced)."""
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from the 256 bytes to printable unicode characters."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
      list(range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


class GPT2Tokenizer:
  """GPT-2 byte-level BPE from `vocab.json` and `merges.txt` (pure Python, cached per word)."""

  name = "gpt2"

  def __init__(self, vocab_path: str, merges_path: str):
    with open(vocab_path, encoding="utf-8") as f:
      self.encoder: dict[str, int] = json.load(f)
    with open(merges_path, encoding="utf-8") as f:
      lines = [l for l in f.read().split("\n") if l and not l.startswith("#version")]
    self.ranks = {tuple(l.split()): i for i, l in enumerate(lines)}
    self.decoder = {v: k for k, v in self.encoder.items()}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    self.pat = _re.compile(_GPT2_PAT)
    self.vocab_size = max(self.encoder.values()) + 1
    self.eos_id = self.encoder.get("<|endoftext|>")
    h = hashlib.sha1()
    for p in (vocab_path, merges_path):
      with open(p, "rb") as f:
        h.update(f.read())
    self.fingerprint = h.hexdigest()[:12]
    self._cache: dict[str, list[int]] = {}

  @classmethod
  def from_dir(cls, d: str) -> "GPT2Tokenizer":
    """The tokenizer whose files lie in directory d."""
    return cls(*(os.path.join(d, f) for f in GPT2_FILES))

  def _bpe(self, token: str) -> list[int]:
    """Merge the characters of one pre-token by rank; ids of the resulting symbols."""
    if token in self._cache:
      return self._cache[token]
    word = tuple(token)
    while len(word) > 1:
      pair = min(zip(word, word[1:]), key=lambda p: self.ranks.get(p, float("inf")))
      if pair not in self.ranks:
        break
      first, second = pair
      new, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
          new.append(first + second)
          i += 2
        else:
          new.append(word[i])
          i += 1
      word = tuple(new)
    ids = [self.encoder[s] for s in word]
    self._cache[token] = ids
    return ids

  def encode(self, text: str) -> np.ndarray:
    """str -> int32 token ids."""
    ids = []
    for piece in self.pat.findall(text):
      ids.extend(self._bpe("".join(self.byte_encoder[b] for b in piece.encode("utf-8"))))
    return np.asarray(ids, np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Token ids -> str (invalid UTF-8 replaced)."""
    s = "".join(self.decoder[int(i)] for i in ids)
    return bytes(self.byte_decoder[c] for c in s).decode("utf-8", errors="replace")


def get_tokenizer(kind: str = "auto", vocab_dir: str | None = None) -> ByteTokenizer | GPT2Tokenizer:
  """'bytes', 'gpt2' (files in vocab_dir must exist) or 'auto' (gpt2 when they exist, else bytes)."""
  present = vocab_dir is not None and all(
      os.path.isfile(os.path.join(vocab_dir, f)) for f in GPT2_FILES)
  if kind == "bytes" or (kind == "auto" and not present):
    return ByteTokenizer()
  if kind not in ("gpt2", "auto"):
    raise ValueError(f"tokenizer must be 'auto', 'bytes' or 'gpt2', got {kind!r}")
  if not present:
    raise DataNotFoundError(
        f"GPT-2 tokenizer files {GPT2_FILES} not found in {vocab_dir!r}. Get them with: "
        f"mkdir -p {vocab_dir} && cd {vocab_dir} && wget {GPT2_URL}/vocab.json {GPT2_URL}/merges.txt")
  return GPT2Tokenizer.from_dir(vocab_dir)


def _stream_dtype(vocab_size: int):
  return np.uint16 if vocab_size <= 65536 else np.int32


def _join(docs: Sequence[np.ndarray], eos_id: int | None, vocab_size: int) -> np.ndarray:
  """Documents' ids as one stream, EOS after each document when the tokenizer has one."""
  tail = [np.asarray([eos_id], np.int32)] if eos_id is not None else []
  parts = [p for d in docs for p in [d, *tail]]
  return np.concatenate(parts).astype(_stream_dtype(vocab_size))


def pydoc_streams(tok, val_frac: float = 0.1) -> dict[str, np.ndarray]:
  """CPython's pydoc topics (sorted by name) as one stream; the last val_frac is 'validation'."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  topics = pydoc_data.topics.topics
  s = _join([tok.encode(topics[k]) for k in sorted(topics)], tok.eos_id, tok.vocab_size)
  n = int(round(len(s) * (1 - val_frac)))
  return {"train": s[:n], "validation": s[n:]}


def _encode_file(path: str, tok: GPT2Tokenizer) -> np.ndarray:
  """A text file, line by line, as one id stream."""
  buf = array.array("i")
  with open(path, encoding="utf-8") as f:
    for k, line in enumerate(f):
      buf.extend(tok.encode(line).tolist())
      if k % 200_000 == 0 and k:
        logging.info("%s: %d lines, %d tokens", path, k, len(buf))
  return np.frombuffer(buf, np.int32).astype(_stream_dtype(tok.vocab_size))


def wikitext103_streams(text_dir: str, tok, cache_dir: str | None = None) -> dict[str, np.ndarray]:
  """WikiText-103 raw splits; bytes are memory-mapped, BPE ids are encoded once and cached."""
  missing = [f for f in WIKITEXT_FILES.values() if not os.path.isfile(os.path.join(text_dir, f))]
  if missing:
    parent = os.path.dirname(os.path.abspath(text_dir))
    raise DataNotFoundError(
        f'Data set \'wikitext103\': {missing} not found in {text_dir!r}. Get the raw files with: '
        f'mkdir -p {parent} && cd {parent} && wget {WIKITEXT_URL} && unzip wikitext-103-raw-v1.zip '
        f'(creates {os.path.join(parent, "wikitext-103-raw")}/wiki.{{train,valid,test}}.raw; '
        f'point cfg.text_dir there).')
  out = {}
  for split, fname in WIKITEXT_FILES.items():
    path = os.path.join(text_dir, fname)
    if os.path.getsize(path) == 0:
      raise DataNotFoundError(f"Data set 'wikitext103': {path} is empty; get the raw files again "
                              f"({WIKITEXT_URL})")
    if isinstance(tok, ByteTokenizer):
      out[split] = np.memmap(path, np.uint8, mode="r")
      continue
    cache = os.path.join(cache_dir or text_dir,
                         f"wikitext103.{split}.{tok.name}-{tok.fingerprint}.npy")
    if not os.path.isfile(cache):
      logging.info("Tokenizing %s into %s (once).", path, cache)
      ids = _encode_file(path, tok)
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      tmp = f"{cache}.tmp{os.getpid()}.npy"
      np.save(tmp, ids)
      os.replace(tmp, cache)
    out[split] = np.load(cache, mmap_mode="r")
  return out


class TextSource(Source):
  """Windows of a token stream: {'inputs', 'targets'} int32 (b, seq_len) per batch."""

  kind = "text"

  def __init__(self, name: str, streams: dict[str, np.ndarray], tokenizer, seq_len: int,
               eval_split: str, files: dict[str, str] | None = None):
    self.name, self.streams, self.tokenizer, self.seq_len = name, streams, tokenizer, seq_len
    self.train_split, self.eval_split = "train", eval_split
    self.augment = None
    self.where = os.path.dirname(next(iter(files.values()))) if files else name
    for split in streams:
      if self.num_examples(split) < 1:
        what = f"{files[split]}: " if files and split in files else f"{name} {split}: "
        raise DataNotFoundError(f"{what}{len(streams[split])} tokens, fewer than "
                                f"seq_len + 1 = {seq_len + 1}")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def input_shape(self) -> tuple[int]:
    return (self.seq_len,)

  def num_examples(self, split: str) -> int:
    """Whole windows of seq_len + 1 tokens (stride seq_len) in a split."""
    return (len(self.streams[split]) - 1) // self.seq_len

  def get_batch(self, split: str, idx: np.ndarray, rngs=None, augment=None) -> dict[str, np.ndarray]:
    """Windows idx of split: inputs and targets (targets = inputs shifted left by one)."""
    del rngs, augment  # windows are not augmented
    s, L = self.streams[split], self.seq_len
    w = np.stack([np.asarray(s[i * L:i * L + L + 1]) for i in np.asarray(idx, np.int64)]) \
        if len(idx) else np.zeros((0, L + 1), np.int32)
    w = w.astype(np.int32)
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}

  def close(self):
    """Nothing to release."""


def pydoc_source(seq_len: int, tok=None, val_frac: float = 0.1) -> TextSource:
  """The offline default corpus (CPython docs), byte-level unless a tokenizer is given."""
  tok = tok or ByteTokenizer()
  return TextSource("pydoc", pydoc_streams(tok, val_frac), tok, seq_len, "validation")


def wikitext103_source(text_dir: str, seq_len: int, tok=None, cache_dir: str | None = None,
                       eval_split: str = "test") -> TextSource:
  """WikiText-103 from its raw files in text_dir."""
  tok = tok or ByteTokenizer()
  files = {k: os.path.join(text_dir, f) for k, f in WIKITEXT_FILES.items()}
  return TextSource("wikitext103", wikitext103_streams(text_dir, tok, cache_dir), tok, seq_len,
                    eval_split, files)
