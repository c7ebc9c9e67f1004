"""A short seeded training loop for the regularizer tests (needs torch: import it only after
``pytest.importorskip("torch")``)."""

import torch
from torch import nn


def train_briefly(model: nn.Module, regularizer, size: int, steps: int = 200) -> None:
    """``steps`` Adam steps on 128 random ``1 x size x size`` images with 4 random labels
    (batches of 32 in turn), cross-entropy plus ``regularizer()``."""
    images, labels = torch.randn(128, 1, size, size), torch.randint(0, 4, (128,))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        batch = slice(32 * (step % 4), 32 * (step % 4 + 1))
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch]) + regularizer()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
