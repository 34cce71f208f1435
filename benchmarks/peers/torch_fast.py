"""PyTorch peer of `lenet-dist train --recipe fast`: the modern LeNet (Conv 16@5x5 SAME,
Conv 32@5x5 VALID, no biases before BatchNorm, ReLU, max pooling, Dense 84, 10; He
normal, Xavier for the logits), AdamW (weight decay 5e-4) on a one-cycle schedule
peaking at 0.01 (optax's cosine_onecycle_schedule: 30% up from peak/25, cosine down to
peak/25e4), label smoothing 0.1, batch 128, 2 epochs, the full test set evaluated after
each. Eager or `torch.compile`. One JSON line per epoch: its test accuracy and the
time.time() at the end of its evaluation, for the driver's time to a target."""

from __future__ import annotations

import json
import time

import torch
from torch import nn

import common
from torch_lenet import train_step

PEAK_LR, EPOCHS, BATCH, SMOOTHING, DECAY = 0.01, 2, 128, 0.1, 5e-4


def modern_lenet() -> nn.Module:
    bn = dict(momentum=0.1, eps=1e-5)  # flax's momentum 0.9 is torch's 0.1
    net = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2, bias=False), nn.BatchNorm2d(16, **bn), nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 32, 5, bias=False), nn.BatchNorm2d(32, **bn), nn.ReLU(),
        nn.MaxPool2d(2, 2), nn.Flatten(),
        nn.Linear(800, 84, bias=False), nn.BatchNorm1d(84, **bn), nn.ReLU(),
        nn.Linear(84, 10))
    for m in net[:-1]:  # flax's he_normal truncates at 2 sigma; torch's does not
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    nn.init.xavier_uniform_(net[-1].weight)
    nn.init.zeros_(net[-1].bias)
    return net


def main() -> None:
    args = common.parse_args(lambda p: p.add_argument("--compile", action="store_true"))
    torch.manual_seed(0)
    images, labels = common.load_train(args.data_dir)
    test_images, test_labels = common.load_train(args.data_dir, "t10k")
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    y_all = torch.from_numpy(labels)
    x_test = torch.from_numpy(test_images).permute(0, 3, 1, 2).float() / 255.0
    y_test = torch.from_numpy(test_labels)
    net = modern_lenet()
    steps = len(y_all) // BATCH
    opt = torch.optim.AdamW(net.parameters(), lr=PEAK_LR, weight_decay=DECAY)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=PEAK_LR, total_steps=EPOCHS * steps, pct_start=0.3,
        anneal_strategy="cos", div_factor=25.0, final_div_factor=1e4, cycle_momentum=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=SMOOTHING)

    step = train_step(net, opt, loss_fn, args.compile)

    def evaluate():
        net.eval()
        with torch.no_grad():
            correct = sum(int((net(x_test[i:i + 1000]).argmax(1) == y_test[i:i + 1000]).sum())
                          for i in range(0, len(y_test), 1000))
        net.train()
        return correct / len(y_test)

    for epoch in range(EPOCHS):
        for idx in common.batches(len(y_all), BATCH, epoch):
            idx = torch.from_numpy(idx)
            step(x_all[idx], y_all[idx])
            schedule.step()
        print(json.dumps({"epoch": epoch + 1, "test_accuracy": evaluate(),
                          "time": time.time()}), flush=True)
    print(json.dumps({"parameters": sum(p.numel() for p in net.parameters())}), flush=True)


if __name__ == "__main__":
    main()
