"""Bad input gets a ValueError or TypeError that names the argument, in every backend."""

import inspect

import pytest
import torch

from conftest import DEVICE
from usp.kernels import BACKENDS as REGISTERED
from usp.kernels import Backend, flash_attn_func, get_backend, local_attention

BACKENDS = ["triton", "torch", "naive"]


def _qkv(b=1, sq=8, sk=8, h=4, hkv=2, d=16, dtype=torch.float32):
    return (torch.randn(b, sq, h, d, dtype=dtype, device=DEVICE),
            torch.randn(b, sk, hkv, d, dtype=dtype, device=DEVICE),
            torch.randn(b, sk, hkv, d, dtype=dtype, device=DEVICE))


FORWARD_ERRORS = [
    # (description, build q/k/v from good ones, exception, message fragment)
    ("3-dim q", lambda q, k, v: (q[0], k, v), ValueError, "q must have 4 dims"),
    ("5-dim k", lambda q, k, v: (q, k[None], v), ValueError, "k must have 4 dims"),
    ("batch mismatch", lambda q, k, v: (q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1)), ValueError,
     "k has batch size 2"),
    ("head dim mismatch", lambda q, k, v: (q, k[..., :8], v[..., :8]), ValueError, "k has head dim 8"),
    ("dtype mismatch", lambda q, k, v: (q, k.half(), v), TypeError, "k has dtype"),
    ("k/v shapes differ", lambda q, k, v: (q, k, v[:, :5]), ValueError, "k and v must have the same shape"),
    ("heads not a multiple", lambda q, k, v: (q[:, :, :3], k, v), ValueError, "multiple of the heads of k"),
    ("head dim over 256", lambda q, k, v: (*(torch.zeros(1, 2, 1, 264, device=DEVICE) for _ in "qkv"),),
     ValueError, "at most 256"),
    ("empty sequence", lambda q, k, v: (q[:, :0], k, v), ValueError, "q must have no empty dimension"),
    ("integer tensor", lambda q, k, v: (q.long(), k, v), TypeError, "q must be a floating-point tensor"),
    ("not a tensor", lambda q, k, v: (q.tolist(), k, v), TypeError, "q must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what, mutate, error, message", FORWARD_ERRORS, ids=[e[0] for e in FORWARD_ERRORS])
def test_forward_rejects(backend, what, mutate, error, message):
    q, k, v = mutate(*_qkv())
    with pytest.raises(error, match=message):
        get_backend(backend).forward(q, k, v, causal=False, softmax_scale=None)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="checks the CPU tensors case")
def test_device_mismatch_is_named():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        get_backend("naive").forward(q, k.to("meta"), v, causal=False, softmax_scale=None)
    out, lse = get_backend("naive").forward(q, k, v, causal=False, softmax_scale=None)
    with pytest.raises(ValueError, match="dout is on meta but q is on cpu"):
        get_backend("naive").backward(q.to("meta"), q, k, v, out, lse, causal=False, softmax_scale=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale, error", [(-1.0, ValueError), (float("nan"), ValueError), ("0.1", TypeError)])
def test_bad_softmax_scale(backend, scale, error):
    with pytest.raises(error, match="softmax_scale"):
        get_backend(backend).forward(*_qkv(), causal=False, softmax_scale=scale)


BACKWARD_ERRORS = [
    ("dout shape", lambda a: dict(a, dout=a["dout"][:, :4]), ValueError, "dout must have the shape of q"),
    ("out shape", lambda a: dict(a, out=a["out"][..., :8]), ValueError, "out must have the shape of q"),
    ("lse shape", lambda a: dict(a, lse=a["lse"].transpose(1, 2)), ValueError, "lse must have shape"),
    ("lse not a tensor", lambda a: dict(a, lse=None), TypeError, "lse must be a torch.Tensor"),
    ("integer lse", lambda a: dict(a, lse=a["lse"].long()), TypeError, "lse must be float32 or float64"),
    ("half lse", lambda a: dict(a, lse=a["lse"].half()), TypeError, "lse must be float32 or float64"),
    ("float64 dout", lambda a: dict(a, dout=a["dout"].double()), TypeError, "dout has dtype torch.float64 but q"),
    ("float16 out", lambda a: dict(a, out=a["out"].half()), TypeError, "out has dtype torch.float16 but q"),
    ("dout not a tensor", lambda a: dict(a, dout=a["dout"].tolist()), TypeError, "dout must be a torch.Tensor"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("what, mutate, error, message", BACKWARD_ERRORS, ids=[e[0] for e in BACKWARD_ERRORS])
def test_backward_rejects(backend, what, mutate, error, message):
    q, k, v = _qkv()
    out, lse = get_backend("naive").forward(q, k, v, causal=False, softmax_scale=None)
    args = mutate(dict(dout=torch.randn_like(q), q=q, k=k, v=v, out=out, lse=lse.float()))
    with pytest.raises(error, match=message):
        get_backend(backend).backward(args["dout"], args["q"], args["k"], args["v"], args["out"], args["lse"],
                                      causal=False, softmax_scale=None)


def test_triton_rejects_float64():
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        get_backend("triton").forward(*_qkv(dtype=torch.float64), causal=False, softmax_scale=None)


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the interpreter only runs without a GPU")
def test_triton_interpreter_refuses_bfloat16():
    with pytest.raises(TypeError, match="interpreter computes wrongly"):
        get_backend("triton").forward(*_qkv(dtype=torch.bfloat16), causal=False, softmax_scale=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_must_be_a_bool(backend):
    with pytest.raises(TypeError, match="causal must be a bool"):
        get_backend(backend).forward(*_qkv(), causal=0.1, softmax_scale=None)


# flash-attn 2's flash_attn_func, parameter by parameter (ours adds a keyword-only backend)
FLASH_ATTN_PARAMETERS = ["q", "k", "v", "dropout_p", "softmax_scale", "causal", "window_size", "softcap",
                         "alibi_slopes", "deterministic", "return_attn_probs"]


def test_flash_attn_func_has_flash_attns_signature():
    parameters = inspect.signature(flash_attn_func).parameters
    assert list(parameters)[:len(FLASH_ATTN_PARAMETERS)] == FLASH_ATTN_PARAMETERS
    assert [p.default for p in list(parameters.values())[3:len(FLASH_ATTN_PARAMETERS)]] == [
        0.0, None, False, (-1, -1), 0.0, None, False, False]
    q, k, v = _qkv()
    backend = "triton" if DEVICE.type == "cuda" else "torch"  # its default
    # positional, in flash-attn's order: dropout_p, softmax_scale, causal
    torch.testing.assert_close(flash_attn_func(q, k, v, 0.0, 0.3, True),
                               local_attention(q, k, v, True, 0.3, backend=backend), rtol=0, atol=0)
    out, lse, probabilities = flash_attn_func(q, k, v, 0.0, None, False, (-1, -1), 0.0, None, True, True)
    expected = local_attention(q, k, v, False, backend=backend, return_lse=True)
    assert torch.equal(out, expected[0]) and torch.equal(lse, expected[1]) and probabilities is None


@pytest.mark.parametrize("option,value,message", [
    ("dropout_p", 0.1, "dropout_p must be 0.0"), ("window_size", (-3, 0), "window_size entries must be >= 0"),
    ("softcap", 30.0, "softcap must be 0.0"), ("alibi_slopes", torch.ones(2), "alibi_slopes must be None")])
def test_flash_attn_func_refuses_what_it_does_not_implement(option, value, message):
    with pytest.raises(ValueError, match=message):
        flash_attn_func(*_qkv(), **{option: value})


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("flash4")


def test_default_backend_follows_the_machine():
    assert get_backend().name == ("triton" if torch.cuda.is_available() else "torch")


def test_the_backends_satisfy_the_protocol():
    q, k, v = _qkv()
    assert sorted(REGISTERED) == sorted(BACKENDS)
    for name, backend in REGISTERED.items():
        assert isinstance(backend, Backend) and backend.name == name
        for method, arguments in (("forward", (q, k, v)), ("backward", (q, q, k, v, q, q[..., 0]))):
            signature = inspect.signature(getattr(backend, method))
            signature.bind(*arguments, causal=True, softmax_scale=None)  # the protocol's call shape binds


def test_any_object_with_the_contract_is_a_backend():
    class Doubled:
        name = "doubled"

        def forward(self, q, k, v, *, causal, softmax_scale):
            out, lse = REGISTERED["naive"].forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
            return 2 * out, lse

        def backward(self, dout, q, k, v, out, lse, *, causal, softmax_scale):
            return REGISTERED["naive"].backward(dout, q, k, v, out, lse, causal=causal, softmax_scale=softmax_scale)

    q, k, v = _qkv()
    mine = get_backend(Doubled())
    assert mine.name == "doubled"
    torch.testing.assert_close(local_attention(q, k, v, backend=mine), 2 * local_attention(q, k, v, backend="naive"))
    with pytest.raises(TypeError, match="backend must be a name in"):
        get_backend(42)
