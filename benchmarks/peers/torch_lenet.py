"""PyTorch peer: the seed's LeNet-5 (same layers, Xavier-uniform weights, zero
biases, SGD lr 0.1), eager or `torch.compile`, on the CPU with torch's own thread
defaults. Runs in the torch environment (setup.sh), not in lenet-dist's."""

from __future__ import annotations

import torch
from torch import nn

import common


def lenet() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.Sigmoid(), nn.AvgPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.Sigmoid(), nn.AvgPool2d(2, 2), nn.Flatten(),
        nn.Linear(400, 120), nn.Sigmoid(), nn.Linear(120, 84), nn.Sigmoid(),
        nn.Linear(84, 10))
    for m in net:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def train_step(net: nn.Module, opt, loss_fn, compile: bool):
    """One step on a uint8 NCHW batch (scaled to [0, 1] inside, as lenet-dist does),
    eager or through torch.compile."""

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.float() / 255.0), y)
        loss.backward()
        opt.step()
        return loss

    return torch.compile(step) if compile else step


def main() -> None:
    args = common.parse_args(lambda p: p.add_argument("--compile", action="store_true"))
    torch.manual_seed(0)
    images, labels = common.load_train(args.data_dir)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    y_all = torch.from_numpy(labels)
    net = lenet()
    opt = torch.optim.SGD(net.parameters(), lr=common.LR)
    loss_fn = nn.CrossEntropyLoss()

    step = train_step(net, opt, loss_fn, args.compile)

    def train_epoch(epoch: int) -> None:
        for idx in common.batches(len(y_all), args.batch_size, epoch):
            idx = torch.from_numpy(idx)
            step(x_all[idx], y_all[idx])

    name = "PyTorch torch.compile" if args.compile else "PyTorch eager"
    common.run(f"{name} {torch.__version__.split('+')[0]}", train_epoch, len(y_all), args,
               sum(p.numel() for p in net.parameters()))


if __name__ == "__main__":
    main()
