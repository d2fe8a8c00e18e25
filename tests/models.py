"""Models the tests train: the seed's ResFFNLogReg and the SambaNova tutorial models."""

from __future__ import annotations

import torch
from torch import nn


def basic_weight_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_normal_(module.weight)
        nn.init.normal_(module.bias, std=0.1)


class ResFFNLogReg(nn.Module):
    """The seed document's model, unchanged."""

    def __init__(self, num_features: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.gemm1 = nn.Linear(num_features, hidden_size, bias=True)
        self.gemm2 = nn.Linear(hidden_size, hidden_size, bias=True)
        self.gemm3 = nn.Linear(hidden_size, num_classes, bias=True)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.tanh1 = nn.Tanh()
        self.sigmoid1 = nn.Sigmoid()
        self.criterion = nn.CrossEntropyLoss()
        self.apply(basic_weight_init)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.gemm1(inputs)
        out = self.norm1(out)
        out = self.tanh1(out)
        residual = out
        out = self.gemm2(out)
        out = self.norm2(out)
        out = out + residual
        out = self.sigmoid1(out)
        out = self.gemm3(out)
        loss = self.criterion(out, targets)
        return loss, out


class LogReg(nn.Module):
    """SambaNova's logistic-regression tutorial model."""

    def __init__(self, num_features: int = 784, num_classes: int = 10) -> None:
        super().__init__()
        self.lin_layer = nn.Linear(num_features, num_classes)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.lin_layer(inputs)
        return self.criterion(out, targets), out


class LeNet(nn.Module):
    """SambaNova's LeNet tutorial model (28x28 single-channel images)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, kernel_size=5, padding=2)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(torch.relu(self.conv1(x)))
        x = self.pool2(torch.relu(self.conv2(x)))
        x = x.reshape(x.shape[0], -1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        out = self.fc3(x)
        return self.criterion(out, labels), out


class DropoutMLP(nn.Module):
    def __init__(
        self, num_features: int = 64, hidden: int = 128, num_classes: int = 10, p: float = 0.5
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, hidden)
        self.drop = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.fc2(self.drop(torch.relu(self.fc1(x))))
        return self.criterion(out, labels), out


class DropoutProbe(nn.Module):
    """Returns its dropped input, to measure the dropout rate."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Linear(1, 1)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dropped = self.drop(x * self.scale.weight)
        return dropped.sum(), dropped


class Logits(nn.Module):
    """No loss inside: the host computes it (the seed's host-loss flow)."""

    def __init__(self, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(num_features, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x)
        if out.sum() > 0:  # data-dependent: cannot be traced
            out = out * 2
        return out.sum()


class UsesNumpy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = float(self.fc(x).abs().max().item())  # untraceable: needs a value
        return (self.fc(x) / scale).sum()


class BatchNormMLP(nn.Module):
    """Buffers that the step updates in place (running statistics)."""

    def __init__(self, num_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(num_features, 32)
        self.bn = nn.BatchNorm1d(32)
        self.out = nn.Linear(32, num_classes)
        self.criterion = nn.CrossEntropyLoss()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.out(torch.relu(self.bn(self.fc(x))))
        return self.criterion(out, labels), out
