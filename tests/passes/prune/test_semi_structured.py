"""2:4 weights through PyTorch's semi-structured sparse kernels (CUDA) give the dense-with-zeros result."""

import pytest
import torch

from optforge.passes.prune.masks import prune_mask
from optforge.passes.prune.semi_structured import is_two_four, semi_structured_available, sparsify_linears


def test_two_four_detection():
    w = torch.tensor([[0.0, 1.0, 0.0, 2.0, 3.0, 0.0, 0.0, 4.0]])
    assert is_two_four(w)
    w[0, 0] = 5.0
    assert not is_two_four(w)


def test_cpu_reports_why_there_is_no_sparse_kernel():
    ok, why = semi_structured_available("cpu")
    assert not ok and "dense" in why
    with pytest.raises(RuntimeError, match="CUDA|capability"):
        sparsify_linears(torch.nn.Sequential(torch.nn.Linear(64, 64)))


@pytest.mark.gpu
def test_sparse_kernel_matches_dense_with_zeros():
    ok, why = semi_structured_available("cuda")
    if not ok:
        pytest.skip(why)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 128, bias=False)).cuda().half()
    with torch.no_grad():
        for m in model:
            m.weight.masked_fill_(prune_mask(m.weight.abs().float(), sparsity=0.0, nm=(2, 4), per_row=True), 0.0)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.float16)  # (B, T, K)
    dense = model(x)
    assert sparsify_linears(model) == ["0", "1"]
    assert type(model[0].weight.data).__name__.startswith("SparseSemiStructuredTensor")
    torch.testing.assert_close(model(x), dense, rtol=2e-2, atol=2e-2)
