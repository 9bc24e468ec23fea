"""``gather_mi``: the MI joint summed over 2 gloo processes equals one process on the combined batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _mi_ranks_worker import build, combined_batch
from _torchrun import run_two_processes

from autoprobe.errors import UsageError


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_gathered_mi_and_ddp_gradients_equal_one_process_on_the_combined_batch(tmp_path: Path) -> None:
    run_two_processes("_mi_ranks_worker.py", tmp_path, timeout=240)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    probed = build(gather_mi=True)  # one process: gathering is a no-op
    x, y = combined_batch()
    total, parts = probed.loss(probed(x), y)
    total.backward()

    mi = [name for name in parts if name.startswith("mi/")]
    assert mi
    for name in mi:
        for rank in ranks:
            assert torch.allclose(rank["parts"][name], parts[name], rtol=1e-5, atol=1e-7), name
            # Without gathering each rank's half batch gives another estimate: the option is what makes them equal.
            assert not torch.allclose(rank["local_parts"][name], parts[name], rtol=1e-3, atol=1e-5), name
    # Per-rank means of CE and NE, averaged by DDP, and the gathered MI: the combined batch's gradient.
    for key, param in probed.named_parameters():
        for rank in ranks:
            assert torch.allclose(rank["grads"][key], param.grad, rtol=1e-4, atol=1e-6), key


def test_gather_mi_is_validated() -> None:
    with pytest.raises(UsageError, match=r"gather_mi applies to loss='imachsr'.*Hint"):
        import autoprobe

        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                  torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3))
        autoprobe.instrument(net, input_size=(3, 8, 8), loss="dsn", loss_options=autoprobe.LossOptions(gather_mi=True))
