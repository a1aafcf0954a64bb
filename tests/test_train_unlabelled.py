"""Issue 14: training from mined pairs (--unlabelled), R-MAC trained end to end, recipes,
weight-space interpolation with held-out domains, and the training device."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image
from typer.testing import CliRunner

from cbir.models import Descriptor
from cbir.models.pooling import RMAC
from cbir.train import TrainConfig, Trainer, load_class_roots, load_train_data, train, with_holdout
from cbir.train.interpolation import choose_alpha, interpolate_state, parse_interpolate
from cbir.train.recipes import DEFAULT_RECIPE, RECIPES, resolve_recipe

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_classes(root: Path, n_classes: int = 5, per_class: int = 4, seed0: int = 0) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            make_image(root / f"class{c}" / f"{i}.jpg", seed=seed0 + 100 * c + i, size=(40, 32))
    return root


def tiny(model: Path, **kw) -> TrainConfig:
    base = dict(model=str(model), epochs=1, max_tuples=4, negatives=2, pool_size=12, batch_size=2, lr=1e-3,
                val_fraction=0.0, keep="last", seed=3, device="cpu")  # fmt: skip
    return TrainConfig(**{**base, **kw})


# -- recipes ---------------------------------------------------------------------------------
def test_recipes_resolve_as_documented() -> None:
    cpu, paper = RECIPES["cpu"].settings, RECIPES["paper"].settings
    assert DEFAULT_RECIPE == "cpu"
    # cpu: bench/finetune.py's validated settings (docs/benchmarks/2026-11-23-finetune.md)
    assert (cpu["lr"], cpu["max_tuples"], cpu["pool_size"], cpu["margin"], cpu["freeze"], cpu["sampling"]) == (
        2e-5, 200, 500, 1.0, 0.4, "class")  # fmt: skip
    # paper: Radenovic et al. 2018 / cirtorch defaults
    assert (paper["lr"], paper["max_tuples"], paper["pool_size"], paper["margin"], paper["freeze"]) == (
        1e-6, 2000, 20000, 0.7, 0.0)  # fmt: skip
    assert paper["sampling"] == "image" and paper["image_size"] == 362 and paper["epochs"] == 100
    # explicit options win; None means "not given"
    r = resolve_recipe("paper", {"lr": 3e-4, "pool_size": None, "epochs": 2})
    assert r["lr"] == 3e-4 and r["pool_size"] == 20000 and r["epochs"] == 2
    assert TrainConfig(**resolve_recipe("cpu", {})).freeze == 0.4
    # another loss without a margin gets that loss's own default margin, not the recipe's
    assert TrainConfig(**resolve_recipe("cpu", {"loss": "triplet"})).effective_margin == 0.1
    assert resolve_recipe("cpu", {"loss": "triplet", "margin": 0.3})["margin"] == 0.3
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_recipe("gpu", {})


def test_train_help_states_the_recipes_values() -> None:
    from cbir.cli.train_cmds import RECIPE_HELP

    cpu, paper = RECIPES["cpu"].settings, RECIPES["paper"].settings
    for text in (f"{cpu['epochs']} epochs of {cpu['max_tuples']}", f"pool {cpu['pool_size']}", "lr 2e-5",
                 f"margin {cpu['margin']}", f"{int(cpu['freeze'] * 100)}%", "class sampling",
                 f"{paper['epochs']} epochs of {paper['max_tuples']:,}", f"pool {paper['pool_size']:,}", "lr 1e-6",
                 f"margin {paper['margin']}", "image sampling", f"{paper['image_size']} px"):  # fmt: skip
        assert text in RECIPE_HELP, text


def test_cli_recipe_fills_unset_options_and_explicit_ones_win(tiny_model_file: Path, tmp_path: Path) -> None:
    from cbir.cli.main import app

    data = make_classes(tmp_path / "d")
    out = tmp_path / "m.cbir"
    args = ["train", str(data), "--out", str(out), "--model", str(tiny_model_file), "--epochs", "1", "--max-tuples",
            "2", "--pool-size", "8", "--val-fraction", "0", "--device", "cpu", "-q"]  # fmt: skip
    r = CliRunner().invoke(app, [*args, "--recipe", "paper", "--image-size", "32"])
    assert r.exit_code == 0, r.output
    cfg = Descriptor.load(out).meta["trained"]["config"]
    assert cfg["recipe"] == "paper" and cfg["lr"] == 1e-6 and cfg["margin"] == 0.7 and cfg["freeze"] == 0.0
    assert cfg["max_tuples"] == 2 and cfg["pool_size"] == 8 and cfg["image_size"] == 32  # explicit
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    cfg = Descriptor.load(out).meta["trained"]["config"]
    assert cfg["recipe"] == "cpu" and cfg["lr"] == 2e-5 and cfg["freeze"] == 0.4 and cfg["sampling"] == "class"


# -- interpolation ---------------------------------------------------------------------------
def test_interpolation_endpoints_reproduce_the_two_networks(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    base = Descriptor.load(tiny_model_file)
    tuned = train(tiny(tiny_model_file, epochs=2), data, progress=False).descriptor
    sd0 = {k: v for k, v in base.state_dict().items() if k in tuned.state_dict()}
    sd1 = tuned.state_dict()
    moved = [k for k in sd1 if sd1[k].is_floating_point() and not torch.equal(sd0[k], sd1[k])]
    assert moved, "training changed nothing"
    for alpha, want in ((0.0, sd0), (1.0, sd1)):
        got = interpolate_state(sd0, sd1, alpha)
        assert all(torch.equal(got[k], want[k]) for k in sd1), alpha
    half = interpolate_state(sd0, sd1, 0.5)
    k = moved[0]
    assert torch.allclose(half[k], (sd0[k] + sd1[k]) / 2)
    # through the trainer: --interpolate 0 gives the off-the-shelf weights back, 1 the fine-tuned
    r0 = train(tiny(tiny_model_file, epochs=2, interpolate=0.0), data, progress=False).descriptor
    r1 = train(tiny(tiny_model_file, epochs=2, interpolate=1.0), data, progress=False).descriptor
    assert all(torch.equal(r0.state_dict()[k], sd0[k]) for k in moved)
    assert all(torch.equal(r1.state_dict()[k], sd1[k]) for k in sd1)
    assert r0.meta["trained"]["interpolation"]["alpha"] == 0.0


def _drift(model: Path, tuned: Descriptor, data) -> float:
    """Mean squared distance between the starting and the tuned network's descriptors of ``data``."""
    t = Trainer(tiny(model), data, progress=False)
    every = np.arange(len(data))
    start = t.embed(data, every, t.infer_pre)
    t.desc.load_state_dict(tuned.state_dict())
    return float(((t.embed(data, every, t.infer_pre) - start) ** 2).sum(axis=1).mean())


def test_distillation_keeps_the_network_near_its_start(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    free = train(tiny(tiny_model_file, epochs=3), data, progress=False).descriptor
    held = train(tiny(tiny_model_file, epochs=3, distill=1000.0), data, progress=False).descriptor
    d_held, d_free = _drift(tiny_model_file, held, data), _drift(tiny_model_file, free, data)
    assert 0 < d_held < 0.5 * d_free
    # the starting network's descriptor of an image is computed once and kept, and is what
    # the starting network gives that image
    trainer = Trainer(tiny(tiny_model_file, distill=1.0), data, progress=False)
    tuples = trainer.mine(1)
    trainer.train_epoch(tuples, 1)
    used = {int(i) for i in np.concatenate([tuples.queries, tuples.positives, tuples.negatives.ravel()]) if i >= 0}
    assert len(trainer.distiller) == len(used)
    some = sorted(used)[:3]
    want = trainer.embed(data, np.array(some), trainer.infer_pre)  # trained weights: must differ
    kept = torch.stack([trainer.distiller._kept[i] for i in some]).numpy()
    trainer.desc.load_state_dict(trainer.initial_state)
    start = trainer.embed(data, np.array(some), trainer.infer_pre)
    np.testing.assert_allclose(kept, start, atol=1e-5)
    assert not np.allclose(kept, want, atol=1e-5)
    # an augmented crop is new at every step: its target is computed, never kept
    aug = Trainer(tiny(tiny_model_file, distill=1.0, augment=True), data, progress=False)
    assert np.isfinite(aug.train_epoch(aug.mine(1), 1)) and len(aug.distiller) == 0
    with pytest.raises(ValueError, match="distillation"):
        tiny(tiny_model_file, distill=-1.0)


def test_interpolation_auto_picks_the_best_validation_weight() -> None:
    best, scores = choose_alpha(lambda a: 1 - (a - 0.6) ** 2)
    assert best == 0.6 and len(scores) >= 5
    assert choose_alpha(lambda a: 0.5)[0] == 1.0  # a tie keeps the most fine-tuning
    assert parse_interpolate("auto") == "auto" and parse_interpolate("0.3") == 0.3 and parse_interpolate(None) is None
    with pytest.raises(ValueError):
        parse_interpolate("1.5")
    with pytest.raises(ValueError):
        parse_interpolate("half")


def test_holdout_domains_join_validation_and_auto_uses_them(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "train")])
    hold = load_class_roots([make_classes(tmp_path / "other", n_classes=3, per_class=3, seed0=7000)])
    v = with_holdout(None, hold)
    assert set(v.domains()) == {"holdout:other"}
    logs: list[str] = []
    res = train(tiny(tiny_model_file, epochs=1, val_fraction=0.4, interpolate="auto", keep="best"), data,
                holdout=hold, progress=False, log=logs.append)  # fmt: skip
    doms = res.history[0].val_domains
    assert doms is not None and set(doms) == {"train", "holdout:other"}
    assert "alpha" in res.extra and res.extra["alpha"] in (0.0, 0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert len(res.extra["alpha_scores"]) == 8 and any("interpolation" in m for m in logs)
    # holdout images are never trained on: no holdout file is in the training data
    assert not set(map(str, hold.files)) & set(map(str, data.files))


def test_interpolate_auto_without_validation_is_an_error(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    with pytest.raises(ValueError, match="validation"):
        train(tiny(tiny_model_file, interpolate="auto"), data, progress=False)


# -- R-MAC end to end ------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["triplet", "contrastive"])
def test_rmac_trains_its_region_whitening_and_exports(tiny_model_file: Path, tmp_path: Path, loss: str) -> None:
    from cbir.runtime import make_runner, torch_runner

    data = load_train_data([make_classes(tmp_path / "d")])
    trainer = Trainer(tiny(tiny_model_file, pooling="rmac", loss=loss), data, progress=False)
    rw = trainer.desc.pooling.region_whitening
    assert isinstance(trainer.desc.pooling, RMAC) and rw is not None
    assert isinstance(rw.projection, torch.nn.Parameter) and rw.projection.requires_grad
    assert "region_whitening" in {g["name"] for g in trainer.optimizer.param_groups}
    init = rw.projection.detach().clone()
    result = trainer.fit()
    out = tmp_path / "rmac.cbir"
    result.descriptor.save(out)
    desc = Descriptor.load(out)
    assert isinstance(desc.pooling, RMAC) and desc.pooling.region_whitening is not None
    assert not torch.equal(desc.pooling.region_whitening.projection, init), "region whitening did not learn"
    assert desc.pooling.region_whitening.meta["kind"] == "pca-regions"
    x = np.stack([desc.preprocess.to_array(Image.open(f).convert("RGB")) for f in data.files[:3]])
    ref = torch_runner(desc)(x)
    onnx = make_runner(desc, "onnx", verbose=False)
    assert onnx.engine == "onnx"
    got = onnx(x)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() > 0.9999


# -- training from mined pairs ----------------------------------------------------------------
pytest.importorskip("cv2")


def test_unlabelled_training_reads_no_folder_name(tiny_model_file: Path, tmp_path: Path, monkeypatch) -> None:
    """Folders named as if they were classes, each mixing several scenes: mining must follow the
    pixels, and the class-folder reader must never be called."""
    from scenes import write_scene_set

    import cbir.data.datasets as datasets
    import cbir.train.data as train_data
    from cbir.cli.main import app

    flat = tmp_path / "flat"
    truth = write_scene_set(flat, n_scenes=3, copies=2, n_singletons=2)
    root = tmp_path / "unlabelled"
    names = sorted(truth)
    where = {}
    for k, name in enumerate(names):  # misleading layout: folder k % 2 mixes every scene
        dest = root / f"class{k % 2}" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((flat / name).read_bytes())
        where[name] = truth[name]

    def no_labels(*a, **k):
        raise AssertionError("a class-folder reader was called")

    monkeypatch.setattr(datasets, "load_class_folders", no_labels)
    monkeypatch.setattr(train_data, "load_class_folders", no_labels)
    out = tmp_path / "m.cbir"
    r = CliRunner().invoke(app, ["train", str(root), "--unlabelled", "--out", str(out), "--model", str(tiny_model_file),
                                 "-k", "20", "--verify", "orb", "--epochs", "1", "--max-tuples", "2",
                                 "--pool-size", "8", "--val-fraction", "0", "--device", "cpu", "-q"])  # fmt: skip
    assert r.exit_code == 0, r.output
    pairs = out.with_name("m.pairs.csv")
    rows = list(csv.reader(pairs.open()))[1:]
    assert rows
    for q, p, _c in rows:
        assert where[Path(q).name] == where[Path(p).name] >= 0  # same scene, never a false pair
    clusters: dict[str, set[int]] = {}
    for q, _p, c in rows:
        clusters.setdefault(c, set()).add(where[Path(q).name])
    assert all(len(s) == 1 for s in clusters.values())
    assert Descriptor.load(out).meta["trained"]["data"] == str(pairs)


def test_device_cpu_trains_on_the_cpu(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    t = Trainer(tiny(tiny_model_file, device="cpu"), data, progress=False)
    assert t.device.type == "cpu" and next(t.desc.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        tiny(tiny_model_file, device="tpu")


def test_training_records_where_it_ran(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    logs: list[str] = []
    res = train(tiny(tiny_model_file), data, progress=False, log=logs.append)
    assert res.device == "cpu" and "training on cpu" in logs
    assert res.descriptor.meta["trained"]["device"] == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU that torch sees")
def test_training_runs_on_the_gpu_and_saves_from_the_cpu(tiny_model_file: Path, tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    torch.cuda.reset_peak_memory_stats()
    res = train(tiny(tiny_model_file, device="auto", epochs=2), data, progress=False)
    assert res.device.startswith("cuda (") and torch.cuda.max_memory_allocated() > 0
    assert res.history[-1].loss is not None and np.isfinite(res.history[-1].loss)
    res.descriptor.save(tmp_path / "m.cbir")
    back = Descriptor.load(tmp_path / "m.cbir")
    assert {p.device.type for p in back.parameters()} == {"cpu"}
    assert back.meta["trained"]["device"] == res.device


def test_a_saturated_validation_is_reported(tiny_model_file: Path, tmp_path: Path, monkeypatch) -> None:
    data = load_train_data([make_classes(tmp_path / "d")])
    monkeypatch.setattr(Trainer, "validate", lambda self: 1.0)
    logs: list[str] = []
    res = train(tiny(tiny_model_file, val_fraction=0.4, keep="best"), data, progress=False, log=logs.append)
    assert res.best_epoch == 0 and any("cannot choose an epoch" in m for m in logs)
