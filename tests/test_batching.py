"""MicroBatcher: concurrent callers' denoiser calls merged into one backend call, each caller's samples unchanged."""

import threading

import numpy as np
import pytest
from checkpoints import make_checkpoint

from emserve.diffusion import make_schedule, sample
from emserve.runtime.batching import MicroBatcher
from emserve.runtime.load import load_runtime

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    return load_runtime(make_checkpoint(tmp_path_factory.mktemp("pairs"), "pairs"), "torch", device="cpu")


def draw(denoise, card, seeds):
    cond = {"dataset": np.full(len(seeds), -1)} if card.datasets else {}
    return sample(denoise, make_schedule(card.schedule, card.timesteps), card.objective, (3, 16, 16), seeds, cond,
                  steps=4)


def test_concurrent_requests_share_backend_calls_and_get_the_samples_they_get_alone(runtime):
    alone = {i: draw(runtime, runtime.card, [10 * i, 10 * i + 1]) for i in range(4)}
    batcher = MicroBatcher(runtime, max_samples=64, max_wait_s=0.05)
    got, barrier = {}, threading.Barrier(4)

    def request(i):
        barrier.wait()
        got[i] = draw(batcher, runtime.card, [10 * i, 10 * i + 1])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    batcher.close()
    for i in range(4):
        np.testing.assert_allclose(got[i], alone[i], atol=1e-5)  # same seed, same sample
    assert batcher.calls < 4 * 4  # four requests of four sampler steps each, merged


def test_a_bad_call_fails_alone_and_the_batcher_keeps_serving(runtime):
    batcher = MicroBatcher(runtime, max_wait_s=0.0)
    with pytest.raises(ValueError, match=r"x: shape \(1, 2, 16, 16\); this model takes \[B, 3, H, W\]"):
        batcher(np.zeros((1, 2, 16, 16), np.float32), np.zeros(1, np.float32), {})
    np.testing.assert_allclose(draw(batcher, runtime.card, [5]), draw(runtime, runtime.card, [5]), atol=1e-6)
    batcher.close()
    with pytest.raises(ValueError, match="batching: max_samples 0 must be >= 1"):
        MicroBatcher(runtime, max_samples=0)
