"""batchssl.eval.features.extract_features: one process against a direct forward, modes, autocast, two processes."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from batchssl.eval.features import extract_features
from helpers import extract_2proc as helper
from helpers import run_entry

HELPER = Path(helper.__file__)  # also run under torchrun, by path


def _direct_forward(backbone: nn.Module, dataset: TensorDataset) -> torch.Tensor:
    images, _ = dataset.tensors
    backbone.eval()
    with torch.no_grad():
        return backbone(images).flatten(1)


def test_one_process_matches_direct_forward():
    backbone, dataset = helper.build()
    feats, labels = extract_features(backbone, dataset, batch_size=5)  # 37 = 7 x 5 + 2: a short last batch
    assert feats.shape == (37, 16) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert labels.dtype == torch.int64 and torch.equal(labels, torch.arange(37))
    # Batch composition changes the conv's summation order: equal up to float rounding, not bitwise.
    torch.testing.assert_close(feats, _direct_forward(backbone, dataset), rtol=1e-5, atol=1e-6)


def test_modes_restored_and_buffers_untouched():
    backbone, dataset = helper.build()
    backbone.train()
    backbone[1].eval()  # a frozen BatchNorm inside a training model must stay frozen afterwards
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    extract_features(backbone, dataset, batch_size=8)
    assert [m.training for m in backbone.modules()] == [True, True, False, True, True]
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, before[k]), k  # a train-mode forward would have updated the BN running stats


def test_autocast_bfloat16_returns_float32_close_to_fp32():
    backbone, dataset = helper.build()
    fp32, _ = extract_features(backbone, dataset)
    bf16, _ = extract_features(backbone, dataset, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # autocast really ran
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


def test_empty_dataset_is_an_error():
    backbone, _ = helper.build()
    with pytest.raises(ValueError, match="empty"):
        extract_features(backbone, TensorDataset(torch.empty(0, 3, 8, 8), torch.empty(0, dtype=torch.long)))


def test_two_processes_gather_in_dataset_order(tmp_path):
    run_entry(HELPER, tmp_path, launcher="torchrun", timeout=180)

    backbone, dataset = helper.build()
    expected, expected_labels = extract_features(backbone, dataset, batch_size=4)
    for rank in (0, 1):  # every process gets the whole result
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["feats"].shape == (37, 16)  # the padding row of the odd shard is gone
        assert torch.equal(result["labels"], expected_labels)  # labels are 0..36: exactly dataset order
        # Rows differ by ~0.1 from each other: any reordering or duplicate would fail this tolerance.
        torch.testing.assert_close(result["feats"], expected, rtol=1e-5, atol=1e-6)
