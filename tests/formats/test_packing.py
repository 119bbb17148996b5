"""int4 packing matches the compressed-tensors pack-quantized layout bit for bit."""

import pytest
import torch

from optforge.formats.packing import pack_int4, unpack_int4


def test_pack_round_trip_both_dims():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert pack_int4(q).shape == (16, 8) and pack_int4(q).dtype == torch.int32
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    assert torch.equal(unpack_int4(pack_int4(q, dim=0), dim=0), q)


def test_pack_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers", reason="compressed-tensors not installed")
    q = torch.randint(-8, 8, (24, 128), dtype=torch.int8)
    assert torch.equal(pack_int4(q), helpers.pack_to_int32(q, 4))
    assert torch.equal(pack_int4(q, dim=0), helpers.pack_to_int32(q, 4, packed_dim=0))


def test_pack_refuses_ragged_rows():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int8))
