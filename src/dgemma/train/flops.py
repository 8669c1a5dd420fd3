"""Model FLOPs of a training step, for the trainer's TFLOP/s and model-FLOP-utilisation (MFU) columns.

Counted the usual way (PaLM's MFU): 2 FLOPs per weight per token for the matrix products a token goes through
(the experts at top_k / E of their weights), plus 4·heads·head_dim·keys for attention's two products, and a
backward pass at twice its forward. Padding tokens inside a batch count: the step computes them. Elementwise
work, norms and the optimizer are not counted, so MFU is a lower bound on how busy the chip is.

The objective's passes (objective.py): the encoder over the clean prefix (forward + backward), decoder pass 1
(forward only, no self-conditioning MLP, then the head and the soft embedding), decoder pass 2 (forward +
backward, with the self-conditioning MLP and the head); the AR baseline is the encoder pass plus its head.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SLIDING
from ..model import Backbone

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched on the device name.
PEAK_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0),
                    ("L4", 121.0))


def peak_tflops(device_name: str) -> float | None:
    """The bf16 dense peak of a known GPU, else None (a CPU, or a GPU not in the table: set `peak_tflops`)."""
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


@dataclass(frozen=True)
class FlopModel:
    layer: int  # weights per token in the layer stack (experts at top_k / E)
    sc: int  # self-conditioning MLP weights
    head: int  # tied head: V · H
    attn: tuple[tuple[int, int], ...]  # per layer: (heads · head_dim, sliding window or 0 for full)

    @classmethod
    def of(cls, bb: Backbone) -> "FlopModel":
        cfg = bb.cfg
        layer = 0
        for lyr in bb.layers:
            for name, p in lyr.named_parameters():
                if name.startswith("experts."):
                    layer += p.numel() * cfg.top_k_experts // cfg.num_experts
                elif p.ndim == 2:
                    layer += p.numel()
        sc = sum(p.numel() for p in bb.self_conditioning.parameters() if p.ndim == 2)
        attn = tuple((cfg.num_attention_heads * cfg.layer_head_dim(i),
                      cfg.sliding_window if cfg.layer_types[i] == SLIDING else 0)
                     for i in range(cfg.num_hidden_layers))
        return cls(layer, sc, cfg.vocab_size * cfg.hidden_size, attn)

    def _attention(self, tokens: int, prefix: float, own: float, causal: bool) -> float:
        """Attention products of `tokens` queries over `prefix` cached keys and `own` keys of their own block (a
        canvas: all of it; an encode: causal, `own` = the block length). A sliding layer's window (W − 1 keys
        before the anchor, as in batch.py) caps the prefix of a canvas and the history of an encode token."""
        total = 0.0
        for hd, w in self.attn:
            if not causal:
                keys = (min(prefix, w - 1) if w else prefix) + own
            else:  # mean over the block's positions p of min(prefix + p + 1, W)
                n = int(own)
                keys = sum(min(prefix + p + 1, w) if w else prefix + p + 1 for p in range(n)) / max(1, n)
            total += 4.0 * hd * tokens * keys
        return total

    def forward(self, tokens: int, prefix: float, own: float, causal: bool = False, sc: bool = False,
                head: bool = False, soft: bool = False) -> float:
        """Forward FLOPs of `tokens` tokens (see `_attention` for prefix / own / causal); `sc`: through the
        self-conditioning MLP; `head`: through the tied head; `soft`: the soft embedding of their logits."""
        f = 2.0 * self.layer * tokens + self._attention(tokens, prefix, own, causal)
        f += 2.0 * (self.sc * sc + self.head * head + self.head * soft) * tokens
        return f

    def step(self, rows: int, enc_len: int, canvas: int, mean_start: float, mode: str = "diffusion",
             ar_head: bool = False) -> float:
        """FLOPs of one micro-batch: `rows` examples, an encoder pass over `enc_len` columns, canvases of `canvas`
        tokens starting on average at `mean_start`."""
        enc = 3.0 * self.forward(rows * enc_len, 0, enc_len, causal=True, head=ar_head or mode == "ar")
        if mode == "ar":
            return enc
        dec_tokens = rows * canvas
        pass1 = self.forward(dec_tokens, mean_start, canvas, head=True, soft=True)
        pass2 = 3.0 * self.forward(dec_tokens, mean_start, canvas, sc=True, head=True)
        return enc + pass1 + pass2
