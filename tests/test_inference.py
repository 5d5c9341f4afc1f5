"""standardize(): determinism, shared noise, batching, padding, progress, cancel, ensemble, bad input."""

import threading
import warnings

import numpy as np
import pytest

from LTDiffPPLib.errors import Cancelled, InputError
from LTDiffPPLib.inference import pick_device, standardize
from LTDiffPPLib.phantom import qa_phantom


@pytest.fixture(scope="module")
def volume():
    return qa_phantom((5, 48, 48), spacing_mm=4.0, noise_hu=20.0, seed=1)


def run(vol, model, **kw):
    kw.setdefault("steps", 3)
    kw.setdefault("device", "cpu")
    return standardize(vol, (0.8, 0.8, 2.0), model, **kw)


def test_output_shape_range_and_input_untouched(volume, tiny_model):
    before = volume.copy()
    out = run(volume, tiny_model)
    assert out.shape == volume.shape and out.dtype == np.float32
    hu = tiny_model.metadata["hu"]
    assert out.min() >= hu["min"] and out.max() <= hu["max"]
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(volume, before)


def test_same_seed_same_output_bitwise(volume, tiny_model):
    a = run(volume, tiny_model, seed=3)
    b = run(volume, tiny_model, seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, run(volume, tiny_model, seed=4))


def test_identical_slices_give_identical_outputs_anywhere_in_the_volume(tiny_model):
    """One noise field for the whole volume: no slice-to-slice flicker of generated texture."""
    sl = qa_phantom((1, 32, 32), spacing_mm=6.0, seed=2)[0]
    vol = np.stack([sl, np.zeros_like(sl), sl, sl])
    out = run(vol, tiny_model, batch_size=3)
    # same batch position: bit-identical; another batch composition: < 0.01 HU (CPU kernel choice)
    np.testing.assert_array_equal(out[0], out[2])
    np.testing.assert_allclose(out[0], out[3], atol=0.01, rtol=0)


def test_batch_size_does_not_change_the_result(volume, tiny_model):
    np.testing.assert_allclose(run(volume, tiny_model, batch_size=1), run(volume, tiny_model, batch_size=4), atol=0.01, rtol=0)


def test_sizes_that_need_padding_keep_their_shape(tiny_model):
    vol = qa_phantom((2, 30, 45), spacing_mm=7.0, seed=0)
    out = run(vol, tiny_model)
    assert out.shape == (2, 30, 45)
    single = run(vol[0], tiny_model)
    assert single.shape == (30, 45)
    np.testing.assert_allclose(single, out[0], atol=0.01, rtol=0)


def test_ensemble_is_the_mean_of_seeded_members(volume, tiny_model):
    members = [run(volume, tiny_model, seed=10 + k) for k in range(3)]
    ens = run(volume, tiny_model, seed=10, ensemble=3)
    hu = tiny_model.metadata["hu"]
    stack = np.stack(members)
    unclipped = ((stack > hu["min"]) & (stack < hu["max"])).all(axis=0)  # clipping happens after averaging
    assert unclipped.mean() > 0.5
    np.testing.assert_allclose(ens[unclipped], stack.mean(axis=0)[unclipped], atol=0.01, rtol=0)
    assert not np.allclose(ens, members[0])


def test_progress_reaches_total_monotonically_and_counts_steps(volume, tiny_model):
    seen = []
    run(volume, tiny_model, steps=4, batch_size=2, progress=lambda d, n: seen.append((d, n)))
    assert len(seen) == 4 * 3  # steps x batches
    done = [d for d, _ in seen]
    assert all(b >= a for a, b in zip(done, done[1:]))
    assert done[-1] == pytest.approx(volume.shape[0]) and all(n == volume.shape[0] for _, n in seen)


def test_cancel_stops_the_run(volume, tiny_model):
    ev = threading.Event()
    calls = []

    def progress(done, total):
        calls.append(done)
        ev.set()

    with pytest.raises(Cancelled):
        run(volume, tiny_model, progress=progress, cancel=ev)
    assert len(calls) == 1


def test_writes_into_a_given_array(volume, tiny_model, tmp_path):
    mm = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float32, shape=volume.shape)
    res = run(volume, tiny_model, out=mm)
    assert res is mm
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), run(volume, tiny_model))


@pytest.mark.parametrize(
    "bad,msg",
    [
        (np.zeros((2, 2, 2, 2), np.float32), "shape"),
        (np.zeros((0, 32, 32), np.float32), "empty"),
        (np.full((1, 32, 32), np.nan, np.float32), "NaN"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_bad_volumes_raise_input_error(bad, msg, tiny_model):
    with pytest.raises(InputError, match=msg):
        run(bad, tiny_model)


def test_bad_settings_raise_input_error(volume, tiny_model):
    for kw in ({"steps": 0}, {"ensemble": 0}, {"solver": "euler"}, {"batch_size": -1}):
        with pytest.raises(InputError):
            run(volume, tiny_model, **kw)


def test_devices():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            pick_device("cuda")


def test_spacing_outside_the_trained_range_warns(tiny_model):
    vol = np.zeros((1, 32, 32), np.float32)
    with pytest.warns(UserWarning, match="spacing"):
        standardize(vol, (3.0, 3.0, 5.0), tiny_model, steps=1, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        standardize(vol, (0.7, 0.7, 5.0), tiny_model, steps=1, device="cpu")


def test_timings_accumulate_per_phase_and_change_nothing(volume, tiny_model):
    import time

    timings = {"encode": 1.0}  # values are added to what is there
    t0 = time.perf_counter()
    out = run(volume, tiny_model, batch_size=2, timings=timings)
    wall = time.perf_counter() - t0
    assert set(timings) == {"copy", "encode", "sample", "decode"}
    assert all(v >= 0 for v in timings.values()) and timings["encode"] > 1.0
    assert sum(timings.values()) - 1.0 <= wall
    np.testing.assert_array_equal(out, run(volume, tiny_model, batch_size=2))


def test_default_cpu_batch_stays_within_0_01_hu_of_the_previous_default(volume, tiny_model):
    """The CPU default batch size (2, chosen for speed; BENCHMARKS.md) is CCC-neutral vs the old default 4."""
    import torch

    from LTDiffPPLib.inference import default_batch_size

    assert default_batch_size(torch.device("cpu")) == 2 and default_batch_size(torch.device("cuda")) == 16
    np.testing.assert_allclose(run(volume, tiny_model), run(volume, tiny_model, batch_size=4), atol=0.01, rtol=0)


def test_bfloat16_precision_is_deterministic_and_close_to_float32():
    """precision="bfloat16" (what CUDA runs by default) on the CPU: same output twice, and within a few HU
    of float32 with the shipped model (its noise is ~120 HU; docs/RESULTS.md compares the CCC)."""
    from LTDiffPPLib.modelfile import load_model

    model = load_model(None)
    vol = qa_phantom((2, 128, 128), spacing_mm=0.7, noise_hu=15.0, seed=0)
    fp32 = standardize(vol, (0.7, 0.7, 1.0), model, device="cpu")
    bf16 = standardize(vol, (0.7, 0.7, 1.0), model, device="cpu", precision="bfloat16")
    np.testing.assert_array_equal(bf16, standardize(vol, (0.7, 0.7, 1.0), model, device="cpu", precision="bfloat16"))
    diff = bf16 - fp32
    assert np.abs(diff).max() > 0.1  # bf16 really ran
    assert np.median(np.abs(diff)) < 5.0 and abs(diff.mean()) < 1.0
    assert np.std(bf16 - vol) == pytest.approx(np.std(fp32 - vol), rel=0.01)
    np.testing.assert_array_equal(fp32, standardize(vol, (0.7, 0.7, 1.0), model, device="cpu", precision="float32"))


def test_unknown_precision_is_refused(volume, tiny_model):
    with pytest.raises(InputError, match="precision"):
        run(volume, tiny_model, precision="float8")
