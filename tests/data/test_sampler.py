import numpy as np
import pytest

from routeformer.data import RandomBatchSampler, eval_batches


@pytest.fixture
def tokens():
    return np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)


def test_windows_are_slices_with_shifted_targets(tokens):
    s = RandomBatchSampler(tokens, seq_len=16, batch_size=4, seed=1)
    x, y = next(s)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        starts = [i for i in range(len(tokens) - 16) if np.array_equal(tokens[i : i + 16], row_x)]
        assert starts and np.array_equal(tokens[starts[0] + 1 : starts[0] + 17], row_y)


def test_resumed_sampler_continues_the_same_stream(tokens):
    a = RandomBatchSampler(tokens, seq_len=8, batch_size=3, seed=7)
    stream = [next(a)[0] for _ in range(6)]
    b = RandomBatchSampler(tokens, seq_len=8, batch_size=3, seed=7)
    for _ in range(2):
        next(b)
    c = RandomBatchSampler(tokens, seq_len=8, batch_size=3, seed=7)
    c.load_state_dict(b.state_dict())
    assert all((next(c)[0] == want).all() for want in stream[2:])
    other_rank = RandomBatchSampler(tokens, seq_len=8, batch_size=3, seed=7, rank=1, world_size=2)
    assert not (next(other_rank)[0] == stream[0]).all()
    with pytest.raises(ValueError, match="same settings"):
        RandomBatchSampler(tokens, seq_len=8, batch_size=3, seed=8).load_state_dict(b.state_dict())


def test_eval_batches_cover_each_target_once(tokens):
    ys = [y for _, y in eval_batches(tokens, seq_len=64, batch_size=5)]
    flat = np.concatenate([y.numpy().ravel() for y in ys])
    n = (len(tokens) - 1) // 64 * 64
    assert np.array_equal(flat, tokens[1 : 1 + n])


def test_image_examples_get_a_zero_start_token():
    images = np.random.default_rng(1).integers(1, 256, 4 * 12).astype(np.uint8)
    s = RandomBatchSampler(images, seq_len=12, batch_size=3, seed=0, example_length=12)
    x, y = next(s)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        k = [i for i in range(4) if np.array_equal(images[i * 12 : (i + 1) * 12], row_y)]
        assert k and row_x[0] == 0 and np.array_equal(row_x[1:], row_y[:-1])
    with pytest.raises(ValueError, match="train.seq_len=12"):
        RandomBatchSampler(images, seq_len=10, batch_size=1, seed=0, example_length=12)
