"""`python -m dynadiag_jax.data.prepare imagenet2012` on a generated stand-in, with TensorFlow blocked."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dynadiag_jax.data import prepare, synthetic

ROOT = Path(__file__).resolve().parents[1]
NO_TF = """
import runpy, sys
sys.argv = ['prepare'] + sys.argv[1:]
try:
  runpy.run_module('dynadiag_jax.data.prepare', run_name='__main__')
except SystemExit as e:
  assert not e.code, e.code
tf = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))
assert not tf, f'TensorFlow was imported: {tf[:5]}'
print('no tensorflow imported')
"""


def _tar_files(path: Path) -> dict[str, bytes]:
  """Every image of an ILSVRC tar (train: through the per-synset inner tars)."""
  out = {}
  with tarfile.open(path) as tar:
    for m in tar.getmembers():
      data = tar.extractfile(m).read()
      if m.name.endswith('.tar'):
        with tarfile.open(fileobj=io.BytesIO(data)) as inner:
          out.update({n.name: inner.extractfile(n).read() for n in inner.getmembers()})
      else:
        out[m.name] = data
  return out


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp('imagenet')
  files = synthetic.write_imagenet_tars(str(d / 'manual'), 14, 6, num_classes=3)
  r = subprocess.run([sys.executable, '-c', NO_TF, 'imagenet2012', f'--manual_dir={d / "manual"}',
                      f'--data_dir={d / "data"}'], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'no tensorflow imported' in r.stdout
  assert 'imagenet2012 prepared in' in r.stdout and 'train 14, validation 6' in r.stdout, r.stdout
  return d, files


def test_layout_and_features_equal_the_registered_builder(prepared, tmp_path):
  d, _ = prepared
  version = d / 'data' / 'imagenet2012' / '5.1.0'
  assert len(list(version.glob('imagenet2012-train.array_record-*'))) == 1
  assert len(list(version.glob('imagenet2012-validation.array_record-*'))) == 1
  registered = tfds.builder('imagenet2012', data_dir=str(tmp_path))  # not prepared: its spec
  assert not registered.is_prepared()
  registered.info.features.save_config(str(tmp_path))
  assert json.loads((version / 'features.json').read_text()) == \
      json.loads((tmp_path / 'features.json').read_text())
  ours = tfds.builder('imagenet2012', data_dir=str(d / 'data'))
  assert ours.is_prepared() and str(ours.version) == '5.1.0'
  assert ours.info.supervised_keys == registered.info.supervised_keys
  assert ours.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def test_examples_labels_and_fixed_images(prepared):
  d, files = prepared
  tars = {**_tar_files(d / 'manual' / 'ILSVRC2012_img_train.tar'),
          **_tar_files(d / 'manual' / 'ILSVRC2012_img_val.tar')}
  label = tfds.builder('imagenet2012', data_dir=str(d / 'data')).info.features['label']
  for split, n in (('train', 14), ('validation', 6)):
    ds = tfds.data_source('imagenet2012', split=split, data_dir=str(d / 'data'),
                          decoders={'image': tfds.decode.SkipDecoding()})
    assert len(ds) == n
    got = {}
    for i in range(n):
      e = ds[i]
      name = e['file_name'].decode() if isinstance(e['file_name'], bytes) else e['file_name']
      got[name] = (e['image'], int(e['label']))
    want = dict(files[split])
    assert set(got) == set(want)
    for name, (data, lab) in got.items():
      assert lab == label.str2int(want[name])  # synset of the inner tar / validation_labels.txt
      with Image.open(io.BytesIO(data)) as img:
        assert img.format == 'JPEG' and img.mode == 'RGB'
      if name in (synthetic.CMYK_NAME, synthetic.PNG_NAME):  # re-encoded as RGB JPEG
        assert data != tars[name]
        with Image.open(io.BytesIO(tars[name])) as src:
          assert (src.format, src.mode) == (('JPEG', 'CMYK') if name == synthetic.CMYK_NAME
                                            else ('PNG', 'RGB'))
          ref = np.asarray(src.convert('RGB'), np.float32)
        x = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'), np.float32)
        assert x.shape == ref.shape and np.abs(x - ref).mean() < 6.0  # q100, 4:2:0 as tfds
      else:
        assert data == tars[name]  # JPEGs are stored as they came
  assert synthetic.CMYK_NAME in dict(files['train']) and synthetic.PNG_NAME in dict(files['train'])


def test_rerun_is_a_no_op_and_missing_tars_are_clear(prepared, tmp_path):
  d, _ = prepared
  before = {p: p.stat().st_mtime_ns for p in (d / 'data').rglob('*') if p.is_file()}
  assert prepare.main(['imagenet2012', f'--manual_dir={d / "manual"}',
                       f'--data_dir={d / "data"}']) == 0
  assert {p: p.stat().st_mtime_ns for p in (d / 'data').rglob('*') if p.is_file()} == before
  assert prepare.main(['imagenet2012', f'--manual_dir={tmp_path}',
                       f'--data_dir={tmp_path / "data"}']) == 2
