"""Shared machinery for tasks whose model is a torch classifier trained with SGD."""

from __future__ import annotations

import abc

import numpy as np
import torch
from torch import nn

from fedcore.errors import ConfigError
from fedcore.privacy import dpsgd
from fedcore.privacy.randomness import dp_random
from fedcore.tasks.base import Dataset, Evaluation, FitOutcome, SiteData, Task, TrainSettings
from fedcore.tensors import Arrays

_EVAL_BATCH = 4096


def check_device(device: str | None) -> None:
    """A torch device this machine has (so sites fail here, not in every round)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ConfigError(f"--device {device}: no such CUDA device on this machine; use --device cpu")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchClassifierTask(Task):
    """A task whose model maps float inputs to class logits, trained with cross-entropy
    (with DP-SGD, fedcore.privacy.dpsgd, when the settings ask for sample-level privacy)."""

    supports_dp_sgd = True

    def __init__(self, model: str | None = None, *, device: torch.device | str | None = None) -> None:
        super().__init__(model)
        self.device = torch.device(device) if device is not None else default_device()

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (initialisation drawn from torch's global generator)."""

    def initial_parameters(self, seed: int) -> Arrays:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.build_model()
        return to_arrays(model)

    def _model_from(self, parameters: Arrays) -> nn.Module:
        model = self.build_model().to(self.device)
        state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in parameters.items()}
        model.load_state_dict(state, strict=True)
        return model

    def fit(self, parameters: Arrays, data: SiteData, settings: TrainSettings) -> FitOutcome:
        model = self._model_from(parameters)
        model.train()
        anchor = [p.detach().clone() for p in model.parameters()] if settings.proximal_mu > 0 else None
        optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
        x = torch.as_tensor(data.train.x, dtype=torch.float32, device=self.device)
        y = torch.as_tensor(data.train.y, dtype=torch.long, device=self.device)
        if settings.dp is not None:
            return self._fit_private(model, x, y, settings, anchor)
        order_rng = np.random.default_rng(settings.seed)
        n = len(y)
        total_loss, seen = 0.0, 0
        for _ in range(settings.local_epochs):
            order = torch.as_tensor(order_rng.permutation(n), device=self.device)
            for start in range(0, n, settings.batch_size):
                batch = order[start : start + settings.batch_size]
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
                total_loss += float(loss.detach()) * len(batch)
                seen += len(batch)
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                    loss = loss + 0.5 * settings.proximal_mu * prox
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        return FitOutcome(
            parameters=to_arrays(model),
            num_examples=n,
            metrics={"train_loss": total_loss / max(seen, 1)},
        )

    def _fit_private(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: TrainSettings,
        anchor: list[torch.Tensor] | None,
    ) -> FitOutcome:
        assert settings.dp is not None
        params = list(model.parameters())

        def proximal_gradient() -> None:  # FedProx's term: data-independent, added after the noise
            if anchor is not None:
                with torch.no_grad():
                    for p, a in zip(params, anchor, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p - a, alpha=settings.proximal_mu)

        train_loss, mechanism = dpsgd.train(
            model,
            x,
            y,
            dp=settings.dp,
            random=dp_random(secure=settings.secure_rng, seed=settings.seed),
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            after_noise=proximal_gradient if anchor is not None else None,
        )
        return FitOutcome(
            parameters=to_arrays(model),
            num_examples=len(y),
            metrics={"train_loss": train_loss, "dp_steps": float(mechanism.steps)},
        )

    @torch.no_grad()
    def evaluate(self, parameters: Arrays, data: Dataset) -> Evaluation:
        model = self._model_from(parameters)
        model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(data), _EVAL_BATCH):
            x = torch.as_tensor(data.x[start : start + _EVAL_BATCH], dtype=torch.float32, device=self.device)
            y = torch.as_tensor(data.y[start : start + _EVAL_BATCH], dtype=torch.long, device=self.device)
            logits = model(x)
            loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(dim=1) == y).sum())
        n = max(len(data), 1)
        return Evaluation(loss=loss_sum / n, accuracy=correct / n, num_examples=len(data))


def to_arrays(model: nn.Module) -> Arrays:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
