"""Train a small CNN on scikit-learn's bundled digits and export it to ONNX.

    python -m filterdb_dask.convert.digits digits.onnx [--epochs 3] [--state-dict digits.pth]
    python -m filterdb_dask.convert.digits digits.onnx --epochs 8 --checkpoints ckpt/

A real trained model for building your own filter DB without downloads (about
30 s on 2 cores). ``--checkpoints DIR`` also writes the model after every epoch
as ``DIR/epoch_<N>.onnx`` (N = 1 .. epochs; the last equals the final model), a
training run to follow with ``ingest --meta epoch=N`` and a drift curve. Needs
torch and scikit-learn.
"""

from __future__ import annotations

import argparse
import os
import warnings


def train(epochs: int = 3, seed: int = 0, on_epoch=None):
    """(model in eval mode, one example input, training accuracy).

    ``on_epoch(epoch, net, example)`` is called after each epoch (1-based) with the
    model in eval mode; training resumes in train mode afterwards, so the weights
    and the final model are the same with or without it.
    """
    import torch
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    d = load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 4 * 4, 10))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for epoch in range(1, epochs + 1):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[i:i + 128]), y[i:i + 128])
            loss.backward()
            opt.step()
        if on_epoch is not None:
            net.eval()
            with torch.no_grad():
                on_epoch(epoch, net, x[:1])
            net.train()
    net.eval()
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    return net, x[:1], acc


def export(net, example, path: str) -> None:
    """ONNX export (TorchScript exporter: folds BatchNorm into the conv weights)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), path, dynamo=False, do_constant_folding=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="the .onnx file to write")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--state-dict", help="also save the state dict here (.pth)")
    p.add_argument("--checkpoints", metavar="DIR",
                   help="also export the model after every epoch as DIR/epoch_<N>.onnx")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error(f"--epochs must be at least 1, got {args.epochs}")
    on_epoch = None
    if args.checkpoints:
        os.makedirs(args.checkpoints, exist_ok=True)

        def on_epoch(epoch, net, example):
            path = os.path.join(args.checkpoints, f"epoch_{epoch}.onnx")
            export(net, example, path)
            print(f"wrote {path}")

    net, example, acc = train(args.epochs, on_epoch=on_epoch)
    export(net, example, args.out)
    if args.state_dict:
        import torch

        torch.save(net.state_dict(), args.state_dict)
    print(f"wrote {args.out} (training accuracy {acc:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
