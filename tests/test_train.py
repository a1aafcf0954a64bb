"""Fine-tuning: losses, hard-negative mining, optimizer groups, exact resume, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import dataset_or_skip, make_image
from typer.testing import CliRunner

from cbir.eval.gpr1200 import evaluate_labelled
from cbir.models import Descriptor, build_descriptor
from cbir.train import (
    TrainConfig,
    TrainData,
    TrainDataError,
    Trainer,
    build_optimizer,
    build_training_descriptor,
    contrastive_loss,
    load_pairs_csv,
    load_train_data,
    mine_epoch,
    nearest_other_class,
    sample_queries,
    split_by_class,
    train,
    triplet_loss,
)
from cbir.train.augment import CROP_AREA, CROP_RATIO, augment_array, crop_box

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def make_classes(root: Path, n_classes: int = 5, per_class: int = 4) -> Path:
    for c in range(n_classes):
        for i in range(per_class):
            make_image(root / f"class{c}" / f"{i}.jpg", seed=100 * c + i, size=(40, 32))
    return root


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    return make_classes(tmp_path / "data")


def tiny_config(model: Path, **kw) -> TrainConfig:
    base = dict(
        model=str(model),
        epochs=2,
        max_tuples=4,
        negatives=2,
        pool_size=12,
        batch_size=2,
        lr=1e-3,
        val_fraction=0.0,
        keep="last",
        seed=3,
    )
    base.update(kw)
    return TrainConfig(**base)


# -- losses ---------------------------------------------------------------------------------
def test_contrastive_loss_matches_the_formula() -> None:
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8]])
    n = torch.tensor([[[0.8, 0.6], [-1.0, 0.0]]])
    d_pos2 = 0.4**2 + 0.8**2
    d_n1 = math.sqrt(0.2**2 + 0.6**2)  # ~0.632 < margin 0.7: penalised
    expected = 0.5 * d_pos2 + 0.5 * (0.7 - d_n1) ** 2  # second negative at distance 2: free
    assert contrastive_loss(q, p, n, 0.7).item() == pytest.approx(expected, rel=1e-5)
    masked = contrastive_loss(q, p, n, 0.7, mask=torch.tensor([[False, True]]))
    assert masked.item() == pytest.approx(0.5 * d_pos2, rel=1e-5)


def test_tuples_unpack_in_the_order_they_were_laid_out() -> None:
    from cbir.train.losses import unpack_tuples
    from cbir.train.mining import EpochTuples

    t = EpochTuples(queries=np.array([0, 5]), positives=np.array([1, 6]),
                    negatives=np.array([[2, 3], [7, -1]]), mean_negative_similarity=0.0)  # fmt: skip
    imgs = t.images(np.array([0, 1]))
    assert imgs == [0, 1, 2, 3, 5, 6, 7]
    vecs = torch.arange(len(imgs), dtype=torch.float32)[:, None].repeat(1, 2)  # row i holds image imgs[i]
    q, p, n, mask = unpack_tuples(vecs, [2, 1], 2)
    assert q[:, 0].tolist() == [0, 4] and p[:, 0].tolist() == [1, 5]
    assert n[..., 0].tolist() == [[2, 3], [6, 4]]  # the missing negative is the query, masked out
    assert mask.tolist() == [[True, True], [True, False]]


def test_triplet_loss_matches_the_formula() -> None:
    q = torch.tensor([[1.0, 0.0]])
    p = torch.tensor([[0.6, 0.8]])
    n = torch.tensor([[[0.8, 0.6], [-1.0, 0.0]]])
    d_pos2 = 0.8
    expected = max(0.0, 0.1 + d_pos2 - 0.4) + max(0.0, 0.1 + d_pos2 - 4.0)
    assert triplet_loss(q, p, n, 0.1).item() == pytest.approx(expected, rel=1e-5)


# -- mining -----------------------------------------------------------------------------------
def test_miner_returns_nearest_images_of_other_classes_one_per_class() -> None:
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(40, 8)).astype(np.float32)
    pool /= np.linalg.norm(pool, axis=1, keepdims=True)
    pool_labels = rng.integers(0, 6, size=40)
    queries = pool[:7]
    q_labels = pool_labels[:7]
    picks = nearest_other_class(queries, q_labels, pool, pool_labels, k=3)
    for qi in range(len(queries)):
        sims = pool @ queries[qi]
        # reference: walk the pool from most to least similar, first image of each new other class
        expected, seen = [], set()
        for j in np.argsort(-sims, kind="stable"):
            if pool_labels[j] != q_labels[qi] and pool_labels[j] not in seen:
                expected.append(j)
                seen.add(pool_labels[j])
        assert picks[qi].tolist() == expected[:3]
        assert all(pool_labels[j] != q_labels[qi] for j in picks[qi])
        assert len({pool_labels[j] for j in picks[qi]}) == 3


def test_miner_pads_when_too_few_classes() -> None:
    pool = np.eye(4, dtype=np.float32)
    picks = nearest_other_class(pool[:1], np.array([0]), pool, np.array([0, 1, 1, 0]), k=3)
    assert picks.tolist() == [[1, -1, -1]]


def test_mine_epoch_never_picks_own_class(class_dir: Path) -> None:
    data = load_train_data([class_dir])
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(len(data), 6)).astype(np.float32)
    tuples = mine_epoch(
        data, lambda idx: vecs[idx], n_tuples=10, n_negatives=3, pool_size=15, rng=rng
    )
    for q, p, negs in zip(tuples.queries, tuples.positives, tuples.negatives, strict=True):
        assert data.labels[p] == data.labels[q] and p != q
        real = negs[negs >= 0]
        assert len(real) > 0
        assert all(data.labels[n] != data.labels[q] for n in real)
        assert len({int(data.labels[n]) for n in real}) == len(real)


# -- data ---------------------------------------------------------------------------------------
def test_pairs_csv(tmp_path: Path) -> None:
    for name in ("a", "b", "c", "d"):
        make_image(tmp_path / f"{name}.jpg", seed=ord(name))
    (tmp_path / "pairs.csv").write_text("query,positive,cluster\na.jpg,b.jpg,1\nc.jpg,d.jpg,2\n")
    data = load_pairs_csv(tmp_path / "pairs.csv")
    assert len(data) == 4 and data.pairs.tolist() == [[0, 1], [2, 3]]
    assert data.labels.tolist() == [1, 1, 2, 2]
    assert data.sample_positive(0, np.random.default_rng(0)) == 1
    (tmp_path / "bad.csv").write_text("a.jpg,b.jpg,1\nb.jpg,c.jpg,2\n")
    with pytest.raises(TrainDataError, match="clusters"):
        load_pairs_csv(tmp_path / "bad.csv")
    (tmp_path / "missing.csv").write_text("a.jpg,zzz.jpg,1\n")
    with pytest.raises(TrainDataError, match="not found"):
        load_pairs_csv(tmp_path / "missing.csv")


def test_validation_split_holds_out_whole_classes(tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d", n_classes=10, per_class=2)])
    tr, va = split_by_class(data, 0.3, seed=0)
    assert set(tr.labels.tolist()).isdisjoint(va.labels.tolist())
    assert len(np.unique(va.labels)) == 3 and len(tr) + len(va) == len(data)


def test_several_roots_keep_classes_apart(tmp_path: Path) -> None:
    a = make_classes(tmp_path / "a", n_classes=2, per_class=2)
    b = make_classes(tmp_path / "b", n_classes=2, per_class=2)  # same class names
    data = load_train_data([a, b])
    assert len(np.unique(data.labels)) == 4
    assert data.classes == ["a/class0", "a/class1", "b/class0", "b/class1"]


def test_stratified_split_holds_out_classes_of_every_root(tmp_path: Path) -> None:
    big = make_classes(tmp_path / "big", n_classes=20, per_class=2)
    small = make_classes(tmp_path / "small", n_classes=6, per_class=2)
    data = load_train_data([big, small])
    assert data.domains().keys() == {"big", "small"}
    for seed in range(5):
        tr, va = split_by_class(data, 0.2, seed=seed)
        held = {data.classes[lab].split("/")[0] for lab in np.unique(va.labels)}
        assert held == {"big", "small"}  # 4 of big, 1 of small: never a root left out
        assert len(np.unique(va.labels)) == 5
        assert set(tr.labels.tolist()).isdisjoint(va.labels.tolist())
        assert va.class_domains == data.class_domains  # the subsets still know the roots


def test_one_root_split_is_unchanged_by_stratification(tmp_path: Path) -> None:
    data = load_train_data([make_classes(tmp_path / "d", n_classes=12, per_class=2)])
    for seed in range(3):
        a = split_by_class(data, 0.25, seed=seed)[1]
        b = split_by_class(data, 0.25, seed=seed, stratify=False)[1]
        assert a.labels.tolist() == b.labels.tolist()


def test_class_sampling_draws_every_class_equally(tmp_path: Path) -> None:
    files = [Path(f"{i}.jpg") for i in range(30 + 5 * 3)]
    labels = [0] * 30 + [c for c in range(1, 6) for _ in range(3)]  # one big class, five small
    data = TrainData(files=files, labels=np.array(labels), classes=[str(c) for c in range(6)])
    rng = np.random.default_rng(0)
    q, p = sample_queries(data, 6 * 4, rng, sampling="class")
    assert np.bincount(data.labels[q], minlength=6).tolist() == [4] * 6
    assert (data.labels[p] == data.labels[q]).all() and (p != q).all()
    q_img, _ = sample_queries(data, 6 * 4, np.random.default_rng(0), sampling="image")
    assert np.bincount(data.labels[q_img], minlength=6)[0] > 4  # by image, the big class dominates
    with pytest.raises(ValueError, match="sampling"):
        sample_queries(data, 4, rng, sampling="domain")


def test_augmentation_crops_and_keeps_the_shape() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_box(60, 80, g)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert CROP_AREA[0] - 0.02 <= h * w / (60 * 80) <= CROP_AREA[1]
        assert CROP_RATIO[0] - 0.05 <= w / h <= CROP_RATIO[1] + 0.05
    img = np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    img.flags.writeable = False  # as the image cache hands them out
    a = augment_array(img, torch.Generator().manual_seed(5))
    b = augment_array(img, torch.Generator().manual_seed(5))
    c = augment_array(img, torch.Generator().manual_seed(6))
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, img)


def test_legacy_checkpoint_config_keeps_its_validation_split() -> None:
    saved = TrainConfig(model="m").to_dict()
    assert TrainConfig.from_dict(saved).stratify is True
    del saved["stratify"], saved["sampling"], saved["augment"]  # written before they existed
    old = TrainConfig.from_dict(saved)
    assert old.stratify is False and old.sampling == "image" and old.augment is False


# -- model and optimizer ---------------------------------------------------------------------------
def test_gem_p_is_learned_with_ten_times_the_rate_and_no_weight_decay(
    tiny_model_file: Path,
) -> None:
    cfg = TrainConfig(model=str(tiny_model_file), lr=2e-6, weight_decay=1e-4)
    desc = build_training_descriptor(cfg)
    assert desc.pooling.p.requires_grad and float(desc.pooling.p.detach()) == pytest.approx(3.0)
    opt, sched = build_optimizer(desc, cfg)
    assert isinstance(opt, torch.optim.Adam)
    assert isinstance(sched, torch.optim.lr_scheduler.ExponentialLR)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["pooling"]["params"] == [desc.pooling.p]
    assert groups["pooling"]["lr"] == pytest.approx(2e-5)
    assert groups["pooling"]["weight_decay"] == 0.0
    assert groups["backbone"]["lr"] == pytest.approx(2e-6)
    assert groups["backbone"]["weight_decay"] == pytest.approx(1e-4)
    assert all(p is not desc.pooling.p for p in groups["backbone"]["params"])


def test_freeze_bn_keeps_running_statistics(tiny_model_file: Path, class_dir: Path) -> None:
    data = load_train_data([class_dir])
    trainer = Trainer(tiny_config(tiny_model_file, epochs=1), data, progress=False)
    bn = next(m for m in trainer.desc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    trainer.train_epoch(trainer.mine(1), 1)
    assert torch.equal(bn.running_mean, before)
    assert not bn.training


def test_freeze_keeps_the_leading_weights_fixed(tiny_model_file: Path, class_dir: Path) -> None:
    data = load_train_data([class_dir])
    trainer = Trainer(tiny_config(tiny_model_file, freeze=0.5), data, progress=False)
    params = list(trainer.desc.backbone.parameters())
    first, last = params[0].detach().clone(), params[-1].detach().clone()
    assert not params[0].requires_grad and params[-1].requires_grad
    trainer.train_epoch(trainer.mine(1), 1)
    assert torch.equal(params[0], first)
    assert not torch.equal(params[-1], last)


def test_loss_falls_over_a_few_steps(tiny_model_file: Path, class_dir: Path) -> None:
    data = load_train_data([class_dir])
    trainer = Trainer(
        tiny_config(tiny_model_file, max_tuples=6, batch_size=6, lr=1e-3), data, progress=False
    )
    tuples = trainer.mine(1)
    losses = [trainer.train_epoch(tuples, 1) for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses


def test_resumed_run_ends_where_an_uninterrupted_one_ends(
    tiny_model_file: Path, class_dir: Path, tmp_path: Path
) -> None:
    data = load_train_data([class_dir])
    full = train(tiny_config(tiny_model_file, epochs=2), data, progress=False)

    ckpt = tmp_path / "ckpt"
    train(tiny_config(tiny_model_file, epochs=1), data, checkpoint_dir=ckpt, progress=False)
    assert (ckpt / "epoch-001.pt").is_file() and (ckpt / "last.pt").is_file()
    resumed = train(
        tiny_config(tiny_model_file, epochs=2), data, resume=ckpt / "last.pt", progress=False
    )

    a, b = full.descriptor.state_dict(), resumed.descriptor.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h.loss for h in full.history] == [h.loss for h in resumed.history]
    # and training did change the weights
    start = build_training_descriptor(tiny_config(tiny_model_file)).state_dict()
    assert any(not torch.equal(start[k], a[k]) for k in a)


def test_resume_is_exact_with_augmentation_and_class_sampling(
    tiny_model_file: Path, class_dir: Path, tmp_path: Path
) -> None:
    data = load_train_data([class_dir])
    kw = dict(augment=True, sampling="class")
    full = train(tiny_config(tiny_model_file, epochs=2, **kw), data, progress=False)
    ckpt = tmp_path / "ckpt"
    train(tiny_config(tiny_model_file, epochs=1, **kw), data, checkpoint_dir=ckpt, progress=False)
    resumed = train(
        tiny_config(tiny_model_file, epochs=2, **kw), data, resume=ckpt / "last.pt", progress=False
    )
    assert full.descriptor.weights_digest() == resumed.descriptor.weights_digest()
    plain = train(tiny_config(tiny_model_file, epochs=2), data, progress=False)
    assert plain.descriptor.weights_digest() != full.descriptor.weights_digest()


def test_validation_is_the_mean_over_roots(tiny_model_file: Path, tmp_path: Path) -> None:
    a = make_classes(tmp_path / "a", n_classes=3, per_class=3)
    b = make_classes(tmp_path / "b", n_classes=3, per_class=3)
    val = load_train_data([a, b])
    train_data = load_train_data([make_classes(tmp_path / "t", n_classes=3, per_class=3)])
    trainer = Trainer(tiny_config(tiny_model_file), train_data, val, progress=False)
    score = trainer.validate()
    feats = trainer.embed(val, np.arange(len(val)), trainer.infer_pre)
    per_root = {}
    for name in ("a", "b"):
        rows = np.array([i for i, f in enumerate(val.files) if f.parent.parent.name == name])
        per_root[name] = evaluate_labelled(feats[rows], val.labels[rows]).mAP
    assert trainer.last_val_domains == pytest.approx(per_root)
    assert score == pytest.approx((per_root["a"] + per_root["b"]) / 2)
    pooled = Trainer(
        tiny_config(tiny_model_file, stratify=False), train_data, val, progress=False
    ).validate()
    assert pooled == pytest.approx(evaluate_labelled(feats, val.labels).mAP)


def test_same_seed_same_model_other_seed_differs(tiny_model_file: Path, class_dir: Path) -> None:
    data = load_train_data([class_dir])
    one = train(tiny_config(tiny_model_file, epochs=1), data, progress=False).descriptor
    two = train(tiny_config(tiny_model_file, epochs=1), data, progress=False).descriptor
    other = train(tiny_config(tiny_model_file, epochs=1, seed=4), data, progress=False).descriptor
    assert one.weights_digest() == two.weights_digest()
    assert one.weights_digest() != other.weights_digest()


def test_output_is_a_descriptor_file_with_learned_whitening(
    tiny_model_file: Path, tmp_path: Path
) -> None:
    data = load_train_data([make_classes(tmp_path / "d", n_classes=8, per_class=3)])
    out = tmp_path / "m.cbir"
    cfg = tiny_config(
        tiny_model_file, epochs=1, val_fraction=0.25, keep="best", whiten=True, whiten_dim=16
    )
    result = train(cfg, data, out=out, progress=False)
    loaded = build_descriptor(str(out))
    assert isinstance(loaded, Descriptor) and loaded.dim == 16
    assert loaded.whitening is not None and loaded.whitening.meta["kind"] == "learned"
    assert loaded.pooling.spec()["learnable"] is True
    hist = loaded.meta["trained"]["history"]
    assert [h["epoch"] for h in hist] == [0, 1] and all(h["val_map"] is not None for h in hist)
    assert result.best_epoch in (0, 1)
    assert result.whitening_val_map is not None
    # whitening was fitted on the training split only: its pair count excludes held-out classes
    n_train = len(data) - 2 * 3
    assert loaded.whitening.meta["pairs"] == n_train * 2


def test_bad_training_data_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainDataError, match="no class folders"):
        load_train_data([tmp_path / "empty"])
    one_each = make_classes(tmp_path / "single", n_classes=3, per_class=1)
    data = load_train_data([one_each])
    with pytest.raises(TrainDataError, match="at least two images"):
        mine_epoch(
            data,
            lambda i: np.zeros((len(i), 2)),
            n_tuples=2,
            n_negatives=1,
            pool_size=3,
            rng=np.random.default_rng(0),
        )
    assert isinstance(data, TrainData)


# -- CLI ---------------------------------------------------------------------------
def test_cli_train_writes_a_model_the_bench_loads(
    tiny_model_file: Path, class_dir: Path, tmp_path: Path
) -> None:
    from cbir.cli.commands import app

    out = tmp_path / "out.cbir"
    args = [
        "train",
        str(class_dir),
        "--model",
        str(tiny_model_file),
        "--epochs",
        "1",
        "--max-tuples",
        "3",
        "--pool-size",
        "10",
        "--negatives",
        "2",
        "--lr",
        "1e-4",
        "--val-fraction",
        "0.4",
        "--sampling",
        "class",
        "--augment",
        "--out",
        str(out),
        "-q",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "kept epoch" in res.output
    saved = Descriptor.load(out).meta["trained"]["config"]
    assert saved["max_tuples"] == 3 and saved["sampling"] == "class" and saved["augment"] is True
    assert (tmp_path / "out.ckpt" / "last.pt").is_file()

    res = CliRunner().invoke(app, ["train", str(tmp_path / "nope"), "--out", str(out), "-q"])
    assert res.exit_code == 4 and "no such folder" in res.output
    res = CliRunner().invoke(app, [*args[:-3], "--loss", "hinge", "--out", str(out), "-q"])
    assert res.exit_code == 2 and "unknown loss" in res.output
    res = CliRunner().invoke(app, [*args[:-3], "--sampling", "domain", "--out", str(out), "-q"])
    assert res.exit_code == 2 and "unknown sampling" in res.output


@pytest.mark.slow
@pytest.mark.dataset
def test_train_on_train_pool_characters(tiny_model_file: Path, tmp_path: Path) -> None:
    root = dataset_or_skip("train-pool/characters")
    data = load_train_data([root])
    cfg = tiny_config(
        tiny_model_file, epochs=1, max_tuples=4, pool_size=40, val_fraction=0.1, keep="last"
    )
    result = train(cfg, data, out=tmp_path / "c.cbir", progress=False)
    assert result.history[-1].val_map is not None and 0.0 < result.history[-1].val_map <= 1.0
    assert Descriptor.load(tmp_path / "c.cbir").dim == result.descriptor.dim


def test_patience_stops_when_validation_stops_improving(
    tiny_model_file: Path, class_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation mAP 0.5 (start), 0.6 (epoch 1), then lower: with patience 2 the run
    stops before epoch 4 and keeps epoch 1; a resume may set the patience too."""
    scores = iter([0.5, 0.6, 0.55, 0.54, 0.9, 0.9])
    monkeypatch.setattr(Trainer, "validate", lambda self: next(scores))
    data = load_train_data([class_dir])
    ckpt = tmp_path / "ckpt"
    cfg = tiny_config(tiny_model_file, epochs=10, patience=2, keep="best")
    result = train(cfg, data, checkpoint_dir=ckpt, progress=False)
    assert [h.epoch for h in result.history] == [0, 1, 2, 3]
    assert result.stopped_early and result.best_epoch == 1
    # resuming the stopped run with a patience of 1 stops at once, still keeping epoch 1
    scores = iter([])
    again = train(
        tiny_config(tiny_model_file, epochs=10, patience=1, keep="best"), data,
        resume=ckpt / "last.pt",
        progress=False,
    )  # fmt: skip
    assert again.stopped_early and again.best_epoch == 1 and len(again.history) == 4
    with pytest.raises(ValueError, match="patience"):
        tiny_config(tiny_model_file, patience=0)
