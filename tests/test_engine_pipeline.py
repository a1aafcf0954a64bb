"""The decode pipeline of :mod:`cbir.extract`: planning, order, failures, workers."""

from __future__ import annotations

import copy
import importlib
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from cbir.data.transforms import Preprocess
from cbir.eval.ranking import block_positive_ranks, positive_ranks
from cbir.extract import decoded_batches, extract, iter_extract
from cbir.runtime import Runner, torch_runner


@pytest.fixture
def mixed_dir(tmp_path: Path) -> list[Path]:
    """Landscape and portrait images interleaved, plus an empty and a corrupt file."""
    root = tmp_path / "mixed"
    files = []
    for i in range(10):
        size = (90, 60) if i % 2 == 0 else (50, 80)
        files.append(make_image(root / f"{i:02d}.jpg", seed=i, size=size))
    (root / "empty.jpg").write_bytes(b"")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return files + [root / "empty.jpg", root / "corrupt.png"]


def _collect(stream) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    for indices, arrays, _ in stream:
        for k, i in enumerate(indices):
            out[i] = arrays[k]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_keep_aspect_batches_are_full_and_single_shaped(
    mixed_dir: list[Path], workers: int
) -> None:
    pre = Preprocess(size=48, resize="keep")
    batches = list(decoded_batches(mixed_dir, pre, batch_size=4, workers=workers))
    shaped = [(idx, arr) for idx, arr, _ in batches if arr is not None]
    # 5 landscape + 5 portrait images: planned as 4 + 1 of each, not one batch per file
    assert sorted(len(idx) for idx, _ in shaped) == [1, 1, 4, 4]
    for idx, arr in shaped:
        assert arr.dtype == np.uint8 and arr.shape[0] == len(idx)
        assert len({pre.output_size(*(90, 60) if i % 2 == 0 else (50, 80)) for i in idx}) == 1
    failures = dict(f for _, _, fails in batches for f in fails)
    assert set(failures) == {10, 11}
    assert "empty" in failures[10]


@pytest.mark.parametrize("resampler", ["pillow", "opencv"])
def test_workers_and_inline_decode_give_identical_pixels(mixed_dir: list[Path], resampler: str) -> None:
    """Forked workers resize like this process, OpenCV included (its thread pool has run in
    this process before the fork: a worker must not touch that pool's settings, which
    waits forever for threads the fork did not copy)."""
    import cv2

    cv2.resize(np.zeros((2000, 2000, 3), np.uint8), (1500, 1500), interpolation=cv2.INTER_AREA)
    pre = Preprocess(size=40, resize="keep", resampler=resampler)
    inline = _collect(decoded_batches(mixed_dir, pre, batch_size=3, workers=0))
    pooled = _collect(decoded_batches(mixed_dir, pre, batch_size=3, workers=2, window=4))
    assert inline.keys() == pooled.keys() == set(range(10))
    for i in inline:
        np.testing.assert_array_equal(inline[i], pooled[i])


@pytest.mark.parametrize("resampler", ["pillow", "opencv"])
def test_threaded_inline_decode_gives_the_same_pixels_and_failures(
    mixed_dir: list[Path], monkeypatch: pytest.MonkeyPatch, resampler: str
) -> None:
    """workers=0 decodes each batch with several threads: same pixels, same failures, in
    the same order as one thread; the threads really ran (more than one decoding thread)."""
    import threading

    ex = importlib.import_module("cbir.extract")  # the package exports a function of that name

    seen: set[int] = set()
    real = ex._decode_one

    def spy(*args, **kwargs):
        seen.add(threading.get_ident())
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "_decode_one", spy)
    pre = Preprocess(size=40, resize="squash", resampler=resampler)
    one = list(decoded_batches(mixed_dir, pre, batch_size=6, workers=0, threads=1))
    assert seen == {threading.get_ident()}
    seen.clear()
    many = list(decoded_batches(mixed_dir, pre, batch_size=6, workers=0, threads=3))
    assert len(seen) > 1 and threading.get_ident() not in seen
    assert [(idx, fails) for idx, _, fails in one] == [(idx, fails) for idx, _, fails in many]
    for (_, a, _), (_, b, _) in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)
    assert {i for _, _, fails in many for i, _ in fails} == {10, 11}


@pytest.mark.parametrize(("cores", "workers"), [(1, 0), (2, 0), (3, 2), (4, 3), (32, 8)])
def test_default_workers_follow_the_cores(monkeypatch: pytest.MonkeyPatch, cores: int, workers: int) -> None:
    """Two cores or fewer: no decode process (decode, then infer); above: cores - 1, 1 to 8."""
    ex = importlib.import_module("cbir.extract")  # the package exports a function of that name

    monkeypatch.setattr(ex, "usable_cores", lambda: cores)
    assert ex.default_workers() == workers


def test_crop_boxes_decide_the_size(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.jpg", seed=1, size=(100, 80))
    pre = Preprocess(size=32, resize="keep")
    boxes = [None, (10, 10, 60, 30), (0, 0, 20, 80)]
    got = _collect(decoded_batches([path] * 3, pre, batch_size=8, workers=0, boxes=boxes))
    assert got[0].shape == (26, 32, 3)
    assert got[1].shape == (13, 32, 3)  # a 50 x 20 crop
    assert got[2].shape == (32, 8, 3)  # a 20 x 80 crop


def test_extract_rows_follow_input_and_match_single_images(
    mixed_dir: list[Path], tiny_descriptor
) -> None:
    # both on the CPU: a GPU's convolutions differ from the CPU's by ~1e-4 (TF32), more than
    # the 1e-5 that checks the rows' order; and the GPU-moved descriptor must come back for `run`
    res = extract(
        tiny_descriptor, mixed_dir, engine="torch", device="auto", batch_size=4, workers=1, progress=False
    )
    assert res.runtime["engine"] == "torch"
    if res.runtime["device"] == "cuda":
        res = extract(tiny_descriptor, mixed_dir, engine="torch", device="cpu", batch_size=4, workers=1,
                      progress=False)  # fmt: skip
    assert res.paths == [os.fspath(p) for p in mixed_dir[:10]]
    assert [Path(f.path).name for f in res.failures] == ["empty.jpg", "corrupt.png"]
    run = torch_runner(tiny_descriptor)
    for k in (0, 3, 9):  # the same vector as describing the file alone
        alone = decoded_batches([mixed_dir[k]], tiny_descriptor.preprocess, workers=0)
        single = _collect(alone)[0]
        np.testing.assert_allclose(res.features[k], run(single[None])[0], atol=1e-5)


def test_iter_extract_can_stop_early(mixed_dir: list[Path], tiny_descriptor) -> None:
    """Closing the generator after one batch shuts the workers down (no hang, no error)."""
    it = iter_extract(
        tiny_descriptor, mixed_dir * 20, engine="torch", batch_size=2, workers=2, progress=False
    )
    first = next(it)
    it.close()
    assert len(first.indices) == 2 and first.vectors.shape == (2, tiny_descriptor.dim)


def test_bad_batch_size_is_a_clear_error(mixed_dir: list[Path]) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        list(decoded_batches(mixed_dir, Preprocess(), batch_size=0))


@pytest.mark.parametrize("max_candidates", [1, 7, 1 << 22])
def test_block_ranks_equal_row_by_row_ranks(max_candidates: int) -> None:
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(13, 60)), 1).astype(np.float32)  # many ties
    scores[3, 10:20] = scores[3, 5]  # a run of exact ties with a positive inside
    positives = [np.sort(rng.choice(60, size=k, replace=False)) for k in rng.integers(0, 6, 13)]
    positives[3] = np.array([5, 12, 40])
    got = block_positive_ranks(scores, positives, max_candidates=max_candidates)
    for r in range(13):
        np.testing.assert_array_equal(got[r], positive_ranks(scores[r], positives[r]))


# ----------------------------------------------------------------------------------------
# lanes: several model calls at once, each on its own thread
# ----------------------------------------------------------------------------------------
def _laned_runner(lanes: int, calls: list[str]) -> Runner:
    """A fake engine whose first ``lanes`` calls must overlap (a barrier they all wait at:
    calls made one after another break it and fail the test) and which records the
    thread of every call. Its vector is the batch's mean pixel per channel."""
    barrier = threading.Barrier(lanes, timeout=20)

    def fn(batch: np.ndarray) -> np.ndarray:
        calls.append(threading.current_thread().name)
        if len(calls) <= lanes:
            barrier.wait()
        return batch.reshape(len(batch), -1, 3).mean(axis=1).astype(np.float32)

    return Runner(fn, engine="onnx", lanes=lanes)


def test_lanes_run_batches_at_once_and_keep_the_planned_order(mixed_dir: list[Path], tiny_descriptor) -> None:
    desc = copy.copy(tiny_descriptor)
    desc.preprocess = Preprocess(size=32)
    calls: list[str] = []
    batches = list(iter_extract(desc, mixed_dir, runner=_laned_runner(2, calls), batch_size=2, workers=0,
                                progress=False))  # fmt: skip
    assert all(name.startswith("cbir-lane") for name in calls) and len(calls) == 5  # 10 images, batches of 2
    # in the planned order, whatever call finished first; failures kept
    assert [i for b in batches for i in b.indices] == list(range(10))
    assert sorted(f.path for b in batches for _, f in b.failures) == sorted(map(str, mixed_dir[10:]))
    one = list(iter_extract(desc, mixed_dir, runner=_laned_runner(1, []), batch_size=2, workers=0, progress=False))
    np.testing.assert_array_equal(np.concatenate([b.vectors for b in batches if b.indices]),
                                  np.concatenate([b.vectors for b in one if b.indices]))  # fmt: skip


def test_a_failing_lane_is_raised_and_stops_the_rest(mixed_dir: list[Path], tiny_descriptor) -> None:
    desc = copy.copy(tiny_descriptor)
    desc.preprocess = Preprocess(size=32)

    def fn(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("engine fault")

    with pytest.raises(RuntimeError, match="engine fault"):
        list(iter_extract(desc, mixed_dir, runner=Runner(fn, engine="onnx", lanes=2), batch_size=2, workers=0,
                          progress=False))  # fmt: skip
    assert not [t for t in threading.enumerate() if t.name.startswith("cbir-lane")]


@pytest.mark.parametrize(
    ("cores", "lanes", "threads", "device", "expected"),
    [
        (2, "auto", None, "cpu", (2, 1)),  # a small machine: one one-thread call per core
        (1, "auto", None, "cpu", (1, 1)),
        (8, "auto", None, "cpu", (1, 8)),  # not measured beyond two cores: one call on all
        (2, "auto", 2, "cpu", (1, 2)),  # threads asked for: one call with them
        (2, None, None, "cpu", (2, 1)),
        (8, 4, None, "cpu", (4, 2)),
        (2, 4, None, "cpu", (4, 1)),
        (2, "auto", None, "cuda", (1, 2)),  # a GPU runs one call at a time
    ],
)
def test_plan_lanes(monkeypatch: pytest.MonkeyPatch, cores: int, lanes, threads, device: str, expected) -> None:
    from cbir.runtime import device as device_module

    monkeypatch.setattr(device_module, "usable_cores", lambda: cores)
    assert device_module.plan_lanes(lanes, threads, device) == expected


@pytest.mark.parametrize("lanes", [0, -1, "two", 1.5])
def test_plan_lanes_refuses_nonsense(lanes) -> None:
    from cbir.runtime.device import plan_lanes

    with pytest.raises(ValueError, match="lanes"):
        plan_lanes(lanes, None, "cpu")
