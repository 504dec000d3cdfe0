"""Packed rows give the same losses as unpacked batches: documents never see each other (target attention, TTT
attention, label shifts), positions restart per document."""

from __future__ import annotations

import pytest
import torch

from spec_lightning.datamodules.chat_datamodule import collate_chat
from spec_lightning.datamodules.packing import collate_packed, pack_rows
from tests.test_draft_lm import TinyDraftLM
from tests.test_eagle3_module import FixedVocab
from tests.test_medusa_module import TinyMedusa

pytestmark = pytest.mark.usefixtures("one_thread")


def samples() -> list[dict]:
    g = torch.Generator().manual_seed(7)
    out = []
    for n, prompt in ((9, 4), (6, 2), (11, 5)):
        ids = torch.randint(3, 128, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "loss_mask": [0] * prompt + [1] * (n - prompt)})
    return out


def both_batches() -> tuple[dict, dict]:
    rows = samples()
    unpacked = collate_chat(rows, pad_id=0)
    packed = collate_packed([{"input_ids": [r["input_ids"] for r in rows],
                              "loss_mask": [r["loss_mask"] for r in rows]}], pad_id=0, length=30)
    return unpacked, packed


def test_packed_batch_layout_by_hand():
    _, packed = both_batches()
    assert packed["position_ids"][0].tolist() == list(range(9)) + list(range(6)) + list(range(11)) + list(range(4))
    assert packed["document_ids"][0].tolist() == [0] * 9 + [1] * 6 + [2] * 11 + [3] * 4
    assert packed["loss_mask"][0, 26:].sum() == 0 and "attention_mask" not in packed
    assert packed["real_tokens"].tolist() == [26]


def test_first_fit_never_splits_and_fills_rows():
    rows = pack_rows([5, 3, 4, 2, 6, 1], length=8, seed=0)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum([5, 3, 4, 2, 6, 1][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 3  # 21 tokens in rows of 8


def test_eagle3_losses_are_equal_packed_and_unpacked():
    torch.manual_seed(0)
    module = FixedVocab(draft_vocab_size=64, ttt_length=3, loss_normalization="valid_positions")
    module.configure_model()
    unpacked, packed = both_batches()
    a, b = module.compute(unpacked), module.compute(packed)
    torch.testing.assert_close(a["step_losses"], b["step_losses"], rtol=1e-5, atol=1e-6)
    assert a["valid"].sum() == b["valid"].sum() > 0
    assert a["correct"].sum() == b["correct"].sum()


def test_medusa_and_draft_lm_losses_are_equal_packed_and_unpacked():
    unpacked, packed = both_batches()
    medusa = TinyMedusa(num_heads=3)
    medusa.configure_model()
    with torch.no_grad():  # make the heads non-trivial
        for p in medusa.heads.blocks.parameters():
            p.normal_(0, 0.1)
    a, b = medusa.compute_losses(unpacked), medusa.compute_losses(packed)
    torch.testing.assert_close(a["head_losses"], b["head_losses"], rtol=1e-5, atol=1e-6)
    assert a["valid"].sum() == b["valid"].sum() > 0
    lm = TinyDraftLM(num_layers=1)
    lm.configure_model()
    torch.testing.assert_close(lm.compute(unpacked)["loss"], lm.compute(packed)["loss"], rtol=1e-5, atol=1e-6)
