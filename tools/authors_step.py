r"""The authors' training step in PyTorch, timed: the other half of the step's pair figure.

Run in a separate environment that has torch (never the project's requirements):

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.13.0 numpy
    /tmp/tv/bin/python tools/authors_step.py --batch_size=128 --steps=5 --warmup=2

What it runs is the reference's CIFAR-10 step (../shared/reference/corinfomax-reference.md,
the authors' serdarozsoy/corinfomax-ssl): torchvision's ResNet-18 with the CIFAR stem
(3x3 stride-1 convolution, no max-pool, fc removed, zero-init residual BatchNorm),
projector 2048-2048-64 (Linear-ReLU-Linear-ReLU-Linear without bias), L2-normalised
outputs, the per-branch covariance loss in float64 (alpha 250, la_R = la_mu = 0.01,
eps 1e-8), SGD momentum 0.9, weight decay 1e-4: the same work as
`python -m corinfomax_tf.benchmark --flagfile=configs/cifar10.cfg` times, on a fixed
batch of two 32x32 views already in memory, after `--warmup` steps, averaged over
`--steps` with one synchronisation at the end (torch on the CPU is synchronous). The
ResNet is written out here (torchvision's BasicBlock layout) so that torchvision is not
needed. Prints one JSON line: images/s, ms/step, threads.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    nn.init.zeros_(self.bn2.weight)          # zero-init residual
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet18Cifar(nn.Module):
  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    layers, cin = [], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
      layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
      cin = cout
    self.layers = nn.Sequential(*layers)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x):
    x = self.layers(F.relu(self.bn1(self.conv1(x))))
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def projector(widths=(2048, 2048, 64), cin=512):
  layers = []
  for w in widths[:-1]:
    layers += [nn.Linear(cin, w), nn.ReLU()]
    cin = w
  return nn.Sequential(*layers, nn.Linear(cin, widths[-1], bias=False))


class CovarianceLoss:
  """The reference's per-branch loss: running mean and covariance in float64."""

  def __init__(self, dim, alpha=250.0, la_r=0.01, la_mu=0.01, eps=1e-8):
    self.alpha, self.la_r, self.la_mu, self.eps = alpha, la_r, la_mu, eps
    self.mu = [torch.zeros(dim, dtype=torch.float64) for _ in range(2)]
    self.r = [torch.eye(dim, dtype=torch.float64) for _ in range(2)]
    self.eye = torch.eye(dim, dtype=torch.float64)

  def __call__(self, z1, z2):
    cov = 0.0
    for q, z in enumerate((z1.double(), z2.double())):
      mu = self.la_mu * self.mu[q] + (1 - self.la_mu) * z.mean(0)
      zc = z - mu
      r = self.la_r * self.r[q] + (1 - self.la_r) * zc.T @ zc / z.shape[0]
      cov = cov - torch.logdet(r + self.eps * self.eye) / z.shape[1]
      self.mu[q], self.r[q] = mu.detach(), r.detach()
    return self.alpha * F.mse_loss(z1, z2) + cov


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  encoder, head = ResNet18Cifar(), projector()
  params = list(encoder.parameters()) + list(head.parameters())
  optimizer = torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-4)
  loss_fn = CovarianceLoss(64)
  rs = np.random.RandomState(0)
  views = torch.from_numpy(rs.randn(2, args.batch_size, 3, 32, 32).astype(np.float32))

  def step():
    z1 = F.normalize(head(encoder(views[0])), dim=1)
    z2 = F.normalize(head(encoder(views[1])), dim=1)
    loss = loss_fn(z1, z2)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss

  for _ in range(args.warmup):
    step()
  start = time.perf_counter()
  for _ in range(args.steps):
    loss = step()
  float(loss.detach())
  seconds = (time.perf_counter() - start) / args.steps
  print(json.dumps({"images_per_second": args.batch_size / seconds,
                    "ms_per_step": 1000 * seconds, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "loss": float(loss.detach()),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()}))


if __name__ == "__main__":
  main()
