"""Embedding on a bare GPU box (torch, timm, pyarrow, pillow; no Ray): our stages vs the original.

Times, on the same generated JPEG shard:
- original: torch DataLoader (4 workers, batch 64), PIL Resize + ToTensor, forward hook on
  ``head``, fp32 on the GPU (DESIGN.md §2);
- our decode stage alone (``galaxysae.decode.decode_batch`` in a process per spare CPU);
- our encode stage alone (``galaxysae.encoder.embed``: bf16 autocast, channels_last, pinned
  memory, batch 128) on ready tensors: the ceiling;
- ours end to end: the decode processes feeding the encoder, as the Ray pipeline does.
- the bare encoder on a ready batch: fp32 vs bf16, with and without channels_last.
Ends with ``target gpu_embed_vs_original: X (goal >= 5) PASS|FAIL`` (``cpu_`` without a GPU).
Usage: ``python bench/gpu_embed.py [--images 8192] [--image-px 424] [--smoke]``.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measurement import attempt  # noqa: E402 - bench/, beside this script

ENCODER = "convnext_nano"


def make_jpegs(n: int, px: int) -> list[bytes]:
    """Procedural blobs as JPEG bytes (a few distinct ones, repeated: decode cost is per image)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:px, 0:px] / px
    out = []
    for _ in range(min(n, 64)):
        cx, cy, s = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
        g = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / s**2)
        img = np.stack([g, g * 0.8, g * 0.6], -1) + rng.normal(0, 0.03, (px, px, 3))
        buf = io.BytesIO()
        Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return [out[i % len(out)] for i in range(n)]


def _decode_chunk(args):
    import pyarrow as pa

    from galaxysae.decode import decode_batch

    images, size = args
    t = pa.table({"id_str": [str(i) for i in range(len(images))],
                  "image": pa.array([{"bytes": b, "path": None} for b in images],
                                    pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                  "path": ["bench"] * len(images)})
    return decode_batch(t, image_size=size)["pixels"]


def original(images: list[bytes], size: int, device: str) -> float:
    import timm
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])

    class Jpegs(Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return tf(Image.open(io.BytesIO(images[i])).convert("RGB"))

    model = timm.create_model(ENCODER, pretrained=False, num_classes=0).eval().to(device)
    feats = []
    model.head.register_forward_hook(lambda m, i, o: feats.append(o.detach().cpu()))
    with torch.no_grad():
        # the device warmed up as ours is (its encoder's probe forward): CUDA context, cuDNN and
        # lazy kernel loading. The DataLoader starts on the clock: its workers would decode
        # batches ahead while nothing was timed (ours starts its decode pool idle, off the clock)
        model(torch.zeros(64, 3, size, size, device=device))
        feats.clear()
        t0 = time.perf_counter()
        for x in DataLoader(Jpegs(), batch_size=64, num_workers=4):
            model(x.to(device))
    return len(images) / (time.perf_counter() - t0)


def _gpu_mem(device: str) -> str:
    import torch

    if not device.startswith("cuda"):
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"


def encoder_only(model, x, device: str, precision: str, channels_last: bool, reps: int) -> float:
    """img/s of the bare forward pass on a ready device tensor x[B, 3, S, S] float32."""
    import torch

    # Module.to converts in place: set the layout both ways, or a channels_last variant would
    # leave the model channels_last for the next one
    m = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    xx = x.to(device)
    if channels_last:
        xx = xx.contiguous(memory_format=torch.channels_last)
    dt = torch.bfloat16 if precision == "bf16" else torch.float32
    with torch.inference_mode(), torch.autocast(device.split(":")[0], dtype=dt,
                                                enabled=precision == "bf16"):
        m(xx)  # warm-up (cuDNN autotune)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            m(xx)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return reps * xx.shape[0] / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--image-px", type=int, default=424)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--decoders", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--reps", type=int, default=20, help="batches per encoder-only variant")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (CI check)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.images, a.image_px, a.size, a.batch, a.decoders, a.reps = 32, 64, 64, 8, 1, 2

    import torch

    from galaxysae import encoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"bench/gpu_embed.py: {a.images} images {a.image_px}px -> {a.size}px on {device} "
          f"({torch.cuda.get_device_name() if device == 'cuda' else 'no GPU'}), "
          f"{a.decoders} decode processes, batch {a.batch}", flush=True)
    images = make_jpegs(a.images, a.image_px)
    chunks = [(images[i:i + a.batch], a.size) for i in range(0, len(images), a.batch)]
    rates: dict[str, float | None] = {}

    def measure(key: str, label: str, fn) -> None:
        """One row of the table; a failure is printed in its place (``measurement.attempt``)."""
        row = f"  {label:<34}"
        rates[key] = attempt(row, fn, device)
        if rates[key] is not None:
            print(f"{row} {rates[key]:10.1f} img/s", flush=True)

    measure("original", "original: DataLoader fp32 loop", lambda: original(images, a.size, device))

    model, info = encoder.load(ENCODER, pretrained=False, image_size=a.size, device=device)
    x = torch.rand(a.batch, 3, a.size, a.size)
    for prec, cl in (("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)):
        if prec == "bf16" and device == "cpu" and not a.smoke:
            continue  # CPU bf16 is emulated on most CPUs: not a figure worth printing
        measure(f"{prec}{cl}", f"encoder only {prec}{' channels_last' if cl else ''}",
                lambda p=prec, c=cl: encoder_only(model, x, device, p, c, a.reps))
    # as EncodeBatch holds it: channels_last on a GPU only
    model = model.to(memory_format=torch.channels_last if device == "cuda" else torch.contiguous_format)
    precision = encoder.resolve_precision("auto", device)

    def decode_stage():
        with ProcessPoolExecutor(a.decoders) as pool:
            list(pool.map(_decode_chunk, chunks[:a.decoders]))  # start the workers
            t0 = time.perf_counter()
            decoded[:] = pool.map(_decode_chunk, chunks)
            return len(images) / (time.perf_counter() - t0)

    def encode_stage():
        encoder.embed(model, decoded[0], device, precision)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for xb in decoded:
            encoder.embed(model, xb, device, precision)
        return len(images) / (time.perf_counter() - t0)

    def pipeline():
        with ProcessPoolExecutor(a.decoders) as pool:
            list(pool.map(_decode_chunk, chunks[:a.decoders]))
            t0 = time.perf_counter()
            for xb in pool.map(_decode_chunk, chunks):
                encoder.embed(model, xb, device, precision)
            return len(images) / (time.perf_counter() - t0)

    decoded: list = []
    measure("decode", f"ours: decode stage ({a.decoders} CPUs)", decode_stage)
    if decoded:
        measure("encode", f"ours: encode stage {precision}", encode_stage)
    del decoded[:]
    measure("ours", f"ours: pipeline ({a.decoders} decode CPUs)", pipeline)
    print(f"  GPU memory peak: {_gpu_mem(device)}")
    tag = "gpu" if device == "cuda" else "cpu"
    rate_orig, rate_ours, rate_encode = rates["original"], rates["ours"], rates.get("encode")
    if rate_orig is None or rate_ours is None:
        print(f"target {tag}_embed_vs_original: not measured (see ERROR above) (goal >= 5) FAIL")
        return 1
    ratio = rate_ours / rate_orig
    ceiling = f"{rate_ours / rate_encode:.2f}" if rate_encode else "n/a"
    print(f"ratio pipeline/original: {ratio:.2f}; pipeline/encode stage: {ceiling}")
    print(f"target {tag}_embed_vs_original: {ratio:.2f} (goal >= 5) {'PASS' if ratio >= 5 else 'FAIL'}")
    return 1 if None in rates.values() else 0


if __name__ == "__main__":
    raise SystemExit(main())
