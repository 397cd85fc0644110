"""Shared fixtures: tiny real transformers models saved as checkpoints, and a numpy reference."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import numpy as np
import pytest
import torch

import modelstore

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)


def tiny_bert_config(**kw):
    from transformers import BertConfig
    cfg = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               vocab_size=97, max_position_embeddings=24, type_vocab_size=2)
    cfg.update(kw)
    return BertConfig(**cfg)


def flip_byte(path: str) -> None:
    """Damage a file as a bad disk would: flip one bit of its middle byte."""
    blob = bytearray(open(path, "rb").read())
    if blob:
        blob[len(blob) // 2] ^= 0x01
        open(path, "wb").write(bytes(blob))


def truncate_half(path: str) -> None:
    """Damage a file as an interrupted copy would: keep its first half."""
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])


#: The ways a stored file is damaged in the corruption sweeps.
DAMAGE = {"flip": flip_byte, "truncate": truncate_half, "delete": os.remove}


def finetuned_copy(sd0: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A fake fine-tune: dense small noise plus a few large changes, like real task vectors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd0.items():
        if not v.dtype.is_floating_point:
            out[k] = v.clone()
            continue
        d = torch.randn(v.shape, generator=g) * scale * 0.1
        big = torch.rand(v.shape, generator=g) < 0.05
        d[big] += torch.randn(int(big.sum()), generator=g) * scale
        out[k] = (v.float() + d).to(v.dtype)
    return out


def save_hf(model_cls, cfg, sd: dict[str, torch.Tensor], path: str) -> str:
    m = model_cls(cfg)
    m.load_state_dict(sd, strict=True)
    m.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def bert_models(tmp_path_factory) -> dict:
    """A pre-trained tiny BertModel and three fine-tuned copies, saved as HF directories."""
    from transformers import BertModel
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("bert")
    cfg = tiny_bert_config()
    m0 = BertModel(cfg)
    sd0 = {k: v.detach().clone() for k, v in m0.state_dict().items()}
    pre = save_hf(BertModel, cfg, sd0, str(root / "pre"))
    tasks, sds = {}, {}
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        sds[name] = finetuned_copy(sd0, seed=10 + i)
        tasks[name] = save_hf(BertModel, cfg, sds[name], str(root / name))
    from safetensors.torch import load_file
    # what from_pretrained/save_pretrained actually wrote (tied or dropped tensors included)
    sd0 = load_file(os.path.join(pre, "model.safetensors"))
    sds = {n: load_file(os.path.join(p, "model.safetensors")) for n, p in tasks.items()}
    return {"cfg": cfg, "pre": pre, "tasks": tasks, "sd0": sd0, "sds": sds, "root": root}


@pytest.fixture()
def store2(bert_models, tmp_path) -> str:
    """A store of tasks alpha and beta on a Task-Arithmetic base, at tmp_path/"s"."""
    tasks = bert_models["tasks"]
    url = str(tmp_path / "s")
    modelstore.build(url, bert_models["pre"], {"alpha": tasks["alpha"], "beta": tasks["beta"]}, keep=0.1)
    return url


# ---- independent numpy reference of PERU-FFT (spec/FORMAT.md semantics) --------------------------

#: PERU-FFT as the references below compute it: the top-m magnitudes, float16 values (the default
#: is DARE with int4 values): `kind_options` of `build`, keywords of `add_task`.
MAGNITUDE = {"sparsify": "magnitude", "value_dtype": "float16"}


def np_f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).numpy()


def ref_topk_global(us: list[np.ndarray], keep: float) -> list[np.ndarray]:
    """Brute force: sort all |u| by (-|u|, global index), keep the first round(m·N), drop zeros."""
    flat = np.concatenate([u.reshape(-1) for u in us]) if us else np.zeros(0, np.float32)
    k = int(np.floor(keep * flat.size + 0.5))
    order = np.lexsort((np.arange(flat.size), -np.abs(flat)))[:k]
    order = order[flat[order] != 0]
    mask = np.zeros(flat.size, bool)
    mask[order] = True
    out, off = [], 0
    for u in us:
        out.append(mask[off:off + u.size].reshape(u.shape))
        off += u.size
    return out


def ref_reconstruct(base: np.ndarray, u: np.ndarray, mask: np.ndarray, value_dtype=np.float16) -> np.ndarray:
    vals = np.where(mask, u, 0).astype(value_dtype).astype(np.float32)
    return base.astype(np.float32) + vals


def ref_quantize(v: np.ndarray, qmax: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The paper-style per-group absmax quantizer, as the spec states it."""
    n = v.size
    groups = -(-n // group)
    padded = np.zeros(groups * group, np.float32)
    padded[:n] = np.abs(v)
    scales = (padded.reshape(groups, group).max(1).astype(np.float64) / qmax).astype(np.float16)
    s = np.repeat(scales.astype(np.float64), group)[:n]
    q = np.where(s > 0, np.rint(v.astype(np.float64) / np.where(s > 0, s, 1)), 0)
    return np.clip(q, -qmax, qmax).astype(np.int8), scales


# ---- S3: moto's real S3 HTTP server on 127.0.0.1 ---------------------------------------------------

def start_moto(port: int = 0, bucket: str = "models"):
    """A moto S3 server on 127.0.0.1 with `bucket`; returns (server, storage options). Quiet: moto
    announces its start on stdout and logs every request, which would garble a tool's JSON."""
    import boto3
    from moto.server import ThreadedMotoServer
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    with contextlib.redirect_stdout(sys.stderr):
        server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    opts = {"key": "test", "secret": "test", "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}
    return server, opts


#: Short texts for tiny tokenizers and evaluation data.
TEXTS = ["the cat sat on the mat", "a dog ran in the park", "the mat sat", "a cat ran", "dog park cat mat the",
         "in the park a dog sat on a mat", "cat", "the the the dog"]


def make_tokenizer(kind: str):
    """A tiny tokenizer trained on TEXTS: WordPiece for BERT (`kind` "bert"), byte-level BPE otherwise."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import BertTokenizerFast, PreTrainedTokenizerFast
    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator(TEXTS * 5, trainers.WordPieceTrainer(vocab_size=60, special_tokens=[
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                 sep_token="[SEP]", mask_token="[MASK]")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def peft_adapter(bert_models, path) -> str:
    """A PEFT LoRA adapter of the tiny BertModel (query, value and word embeddings), saved at `path`."""
    peft = pytest.importorskip("peft")
    from transformers import BertModel
    m = BertModel(bert_models["cfg"])
    m.load_state_dict(bert_models["sd0"], strict=False)
    torch.manual_seed(3)
    pm = peft.get_peft_model(m, peft.LoraConfig(init_lora_weights=False, r=8, lora_alpha=16,
                                                target_modules=["query", "value", "word_embeddings"]))
    pm.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def reference(bert_models, tmp_path_factory):
    """One single-writer store per checkpoint, each task added with the default options: what every
    concurrently added task must equal."""
    root = tmp_path_factory.mktemp("ref")
    out = {}
    for name, path in bert_models["tasks"].items():
        url = str(root / name)
        modelstore.init(url, bert_models["pre"])
        out[name] = modelstore.add_task(url, "t", path).load("t")
    return out


@pytest.fixture(scope="module")
def s3_server():
    server, opts = start_moto()
    yield opts
    server.stop()


@pytest.fixture(params=["local", "s3"])
def shared(request, tmp_path, bert_models):
    """A store with θ0 only, on a local disk or on moto's S3 server, and its storage options."""
    if request.param == "local":
        url, opts = str(tmp_path / "shared"), None
    else:
        opts = request.getfixturevalue("s3_server")
        url = f"s3://models/shared-{tmp_path.name}"
    modelstore.init(url, bert_models["pre"], storage_options=opts)
    return url, opts
