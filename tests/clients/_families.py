"""Model families users bring, built from tiny configs with random weights (no downloads).

Each family gives ``build() -> nn.Module`` (a fresh float model; same architecture every call),
``inputs() -> dict`` (keyword example inputs) and the recipe it is quantized with: ternary or
binary weights, signed 4-bit LSQ activations (transformer and conv inputs are signed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SIGNED_A4 = {"method": "lsq", "bits": 4, "signed": True}
TERNARY = {"method": "twn", "bits": 2}
BINARY = {"method": "binary", "bits": 1}


def recipe(weight: dict = TERNARY, act: dict | None = SIGNED_A4, rules: list | None = None) -> dict:
    return {"default": {"weight": weight, "activation": act}, "rules": rules or []}


@dataclass
class Family:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict[str, Tensor]]
    recipe: dict
    # cells known not to pass, with the reason (the test is then an xfail, strict)
    xfail: dict[str, str] = field(default_factory=dict)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(vocab: int = 64, shape: tuple[int, int] = (2, 8)) -> dict[str, Tensor]:
    return {"input_ids": torch.randint(0, vocab, shape, generator=_gen(1))}


def _lm_ids() -> dict[str, Tensor]:
    # with an attention mask, as language models are called (without one, transformers looks
    # for packed sequences with torch.diff, which the TorchScript ONNX exporter cannot export)
    ids = _ids()
    return {**ids, "attention_mask": torch.ones_like(ids["input_ids"])}


def _image(c: int = 3, hw: int = 32, n: int = 2) -> dict[str, Tensor]:
    return {"pixel_values": torch.randn(n, c, hw, hw, generator=_gen(1))}


# ----------------------------------------------------------------------------------------------
# transformers
# ----------------------------------------------------------------------------------------------
def _hf(config_cls: str, model_cls: str, module: str = "transformers", **cfg: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import importlib

        tr = importlib.import_module("transformers")
        config = getattr(tr, config_cls)(**cfg)  # default attention implementation (sdpa)
        cls = getattr(importlib.import_module(module), model_cls)
        return cls(config).eval()

    return build


TEXT = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32}


def transformers_families() -> list[Family]:
    return [
        Family("bert", _hf("BertConfig", "BertForSequenceClassification", num_labels=3, **TEXT), _ids,
               recipe()),
        Family("gpt2", _hf("GPT2Config", "GPT2LMHeadModel", vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                           n_positions=32, use_cache=False), _lm_ids, recipe()),
        Family("llama", _hf("LlamaConfig", "LlamaForCausalLM", vocab_size=64, hidden_size=32,
                            intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=32, use_cache=False),
               _lm_ids, recipe()),
        Family("vit", _hf("ViTConfig", "ViTForImageClassification", image_size=16, patch_size=4,
                          hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          num_labels=5),
               lambda: _image(hw=16), recipe()),
        Family("resnet", _hf("ResNetConfig", "ResNetForImageClassification", embedding_size=8,
                             hidden_sizes=[8, 16], depths=[1, 1], num_labels=5),
               _image, recipe()),
        Family("convnext", _hf("ConvNextConfig", "ConvNextForImageClassification", hidden_sizes=[8, 16],
                               num_stages=2, depths=[1, 1], num_labels=5), _image, recipe()),
        Family("mobilenet_v2", _hf("MobileNetV2Config", "MobileNetV2ForImageClassification", image_size=32,
                                   depth_multiplier=0.25, num_labels=5), _image, recipe()),
        Family("whisper_encoder", _hf("WhisperConfig", "WhisperEncoder",
                                      "transformers.models.whisper.modeling_whisper", d_model=32,
                                      encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                                      num_mel_bins=16, max_source_positions=16, vocab_size=64,
                                      decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64),
               lambda: {"input_features": torch.randn(2, 16, 32, generator=_gen(1))}, recipe()),
    ]


# ----------------------------------------------------------------------------------------------
# plain PyTorch
# ----------------------------------------------------------------------------------------------
class FunctionalResNet(nn.Module):
    """Functional calls (F.relu, F.avg_pool2d, torch.flatten) and residual additions."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.stem(x))
        h = F.relu(h + self.bn(self.b2(F.relu(self.b1(h)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


class LSTMTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 16)
        self.rnn = nn.LSTM(16, 32, batch_first=True)
        self.fc = nn.Linear(32, 5)

    def forward(self, input_ids: Tensor) -> Tensor:
        h, _ = self.rnn(self.emb(input_ids))
        return self.fc(h)


class AudioConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(1, 8, 9, stride=4, padding=4)
        self.c2 = nn.Conv1d(8, 16, 5, stride=2, padding=2)
        self.fc = nn.Linear(16, 4)

    def forward(self, wave: Tensor) -> Tensor:
        h = F.gelu(self.c2(F.gelu(self.c1(wave))))
        return self.fc(h.mean(-1))


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(12, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.norm = nn.LayerNorm(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.fc(self.norm(h + a))


class DepthwiseSeparable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.bn = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self.stem(x))
        h = F.relu6(self.bn(self.pw(F.relu6(self.dw(h)))))
        return self.fc(h.mean((2, 3)))


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(10, 16)
        self.shared = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(self.emb(input_ids))))


def plain_families() -> list[Family]:
    return [
        Family("functional_resnet", FunctionalResNet,
               lambda: {"x": torch.randn(2, 3, 8, 8, generator=_gen(1))}, recipe()),
        Family("lstm", LSTMTagger, _ids, recipe()),
        Family("conv1d_audio", AudioConv1d, lambda: {"wave": torch.randn(2, 1, 256, generator=_gen(1))},
               recipe()),
        Family("multihead_attention", AttnNet, lambda: {"x": torch.randn(2, 6, 12, generator=_gen(1))},
               recipe(rules=[{"match": "attn.out_proj", "activation": None}])),
        Family("depthwise_separable", DepthwiseSeparable,
               lambda: {"x": torch.randn(2, 3, 8, 8, generator=_gen(1))}, recipe(BINARY)),
        Family("called_twice", CalledTwice, lambda: {"x": torch.randn(4, 10, generator=_gen(1))}, recipe()),
        Family("tied_embedding_head", TiedLM, _ids, recipe()),
    ]
