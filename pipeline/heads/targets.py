"""The training targets: each a loss, its gradient and its group probabilities."""

from __future__ import annotations

import torch

from pipeline.heads.data import HeadData
from pipeline.heads.model import age_thresholds, ordinal_group_probs, soft_group_targets
from pipeline.heads.stack_ops import Stack

HUBER_YEARS = 2.0   # age loss is quadratic within 2 years of the truth, linear beyond


def init_coral(net: "Stack", data: HeadData) -> None:
    """CORAL's last layer: one weight column shared by the C-1 cumulative logits, biases from the training prevalence.

    The shared column is kept shared by giving every column the same (summed)
    gradient (tie_coral_gradient): equal values, equal gradients and equal Adam
    state stay equal. Starting the biases at logit P(group > j) makes them
    non-increasing from the first step, which CORAL's rank consistency needs.
    """
    C = data.n_classes
    W, b = net.W[-1], net.b[-1]
    with torch.no_grad():
        W.copy_(W[:, :, :1].expand_as(W))
        above = (data.train_group.unsqueeze(1) > torch.arange(C - 1, device=W.device)).float().mean(0)
        b.copy_(torch.logit(above.clamp(1e-4, 1 - 1e-4)).expand_as(b))
        for (bw, bb), w, bias in zip(net.best, net.W, net.b):
            bw.copy_(w)
            bb.copy_(bias)


def tie_coral_gradient(grad_w: torch.Tensor) -> None:
    """[K, h, C-1] per-column gradients -> each column the sum: the gradient of the one shared weight vector."""
    grad_w.copy_(grad_w.sum(2, keepdim=True).expand_as(grad_w))


def coral_loss(z: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """Per row: sum over j of the binary cross-entropy of logit z_j against [group > j]."""
    return torch.nn.functional.binary_cross_entropy_with_logits(z, above, reduction="none").sum(-1)


def huber(r: torch.Tensor, beta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a < beta, 0.5 * r * r / beta, a - 0.5 * beta)


AGE_TARGETS = ("age", "soft")   # targets computed from the age in years, not only the group


def missing_ages_message(target: str) -> str:
    """labels.AGE_UNKNOWN (-1): a labels file or class folder gave only the group of some rows."""
    return (f"--target {target} needs an age for every train and val row; this file has rows labelled with a "
            f"group only (stored age -1, from a 'group' label column or a range folder)")


class Target:
    """One training target family for a stack of K heads of the same target.

    The trainer calls `start_epoch` with the epoch's rows, `gradient` for each batch
    (dLoss/dZ of the batch mean, class-weighted as torch does), `epoch_scores` for the
    epoch's training loss and groups, and `validate` for each head's validation loss.
    """

    def __init__(self, data: HeadData, configs: list, weights: torch.Tensor):
        self.data, self.configs, self.weights = data, configs, weights
        self.device = data.device

    def prepare(self, net: Stack) -> None:
        """Adjust the freshly initialised stack (CORAL ties its last layer)."""

    def tie_gradient(self, grad_w: torch.Tensor) -> None:
        """Adjust the last layer's gradient before the Adam step."""

    def start_epoch(self, order, grp_epoch, w_epoch, inv_norm) -> None:
        raise NotImplementedError

    def gradient(self, Z: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        raise NotImplementedError

    def epoch_scores(self, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Per-row batch-mean loss terms [K, n], predicted groups [K, n], extra per-head lists."""
        raise NotImplementedError

    def validate(self, z, y, w, k, lo, hi) -> tuple[torch.Tensor, torch.Tensor, float]:
        """One chunk of validation rows of head k: per-row loss, predicted group, summed absolute age error."""
        raise NotImplementedError

    def finish(self, result) -> None:
        """Record what the checkpoint needs besides the weights."""


class GroupTarget(Target):
    """Cross-entropy on the groups, with class weights w and label smoothing e, as torch's:
    loss_i = -sum_c T[y_i, c] log p_ic, T[y, c] = (1-e) w_y [y=c] + e w_c / C, divided by
    sum_i w_{y_i}. Its gradient is (sum_c T[y_i, c]) p_i - T[y_i]."""

    def __init__(self, data, configs, weights):
        super().__init__(data, configs, weights)
        K, C = len(configs), data.n_classes
        eps = torch.tensor([c.label_smoothing for c in configs], device=self.device).view(K, 1, 1)
        eye = torch.eye(C, device=self.device)
        self.T = (1 - eps) * weights.unsqueeze(2) * eye + eps * weights.unsqueeze(1) / C     # [K, y, c]
        self.ar = torch.arange(K, device=self.device).view(K, 1)

    def epoch_targets(self, order, grp_epoch, w_epoch, inv_norm):
        return self.T[self.ar, grp_epoch] * inv_norm.unsqueeze(2)                       # [K, n, C], batch-normalized

    def start_epoch(self, order, grp_epoch, w_epoch, inv_norm):
        self.T_epoch = self.epoch_targets(order, grp_epoch, w_epoch, inv_norm)
        self.s_epoch = self.T_epoch.sum(2, keepdim=True)                                # [K, n, 1]

    def gradient(self, Z, lo, hi):
        return torch.softmax(Z, dim=2).mul_(self.s_epoch[:, lo:hi]).sub_(self.T_epoch[:, lo:hi])

    def epoch_scores(self, Z):
        return -(self.T_epoch * torch.log_softmax(Z, dim=2)).sum(2), Z.argmax(2), {}

    def validate(self, z, y, w, k, lo, hi):
        per = -(self.T[k][y] * torch.log_softmax(z, dim=1)).sum(1)   # class weights are inside T
        return per, z.argmax(1), 0.0


class SoftTarget(GroupTarget):
    """Cross-entropy against the age's soft label: the one-hot row becomes q_i (class weight of the
    true group kept), T_i = w_{y_i} q_i, so the gradient keeps the form (sum_c T_ic) p_i - T_i."""

    def __init__(self, data, configs, weights):
        super().__init__(data, configs, weights)
        self.soft_rows = torch.stack([soft_group_targets(data.train_age, data.group_edges, c.soft_sigma)
                                      for c in configs])                                # [K, n, C]
        self.soft_val = torch.stack([soft_group_targets(data.val_age, data.group_edges, c.soft_sigma)
                                     for c in configs])                                 # [K, n_val, C]

    def epoch_targets(self, order, grp_epoch, w_epoch, inv_norm):
        return self.soft_rows[self.ar, order] * (w_epoch * inv_norm).unsqueeze(2)

    def validate(self, z, y, w, k, lo, hi):
        return -(self.soft_val[k][lo:hi] * torch.log_softmax(z, dim=1)).sum(1) * w, z.argmax(1), 0.0


class OrdinalTarget(Target):
    """CORAL: binary cross-entropy of each cumulative logit z_j against [group > j], summed over j,
    class-weighted per row and averaged over the batch as cross-entropy is. dLoss/dz_j = sigmoid(z_j) - t_j."""

    def __init__(self, data, configs, weights):
        super().__init__(data, configs, weights)
        C = data.n_classes
        self.above_all = (data.train_group.unsqueeze(1) > torch.arange(C - 1, device=self.device)).float()  # [n, C-1]

    def prepare(self, net):
        init_coral(net, self.data)

    def tie_gradient(self, grad_w):
        tie_coral_gradient(grad_w)

    def start_epoch(self, order, grp_epoch, w_epoch, inv_norm):
        self.above_epoch = self.above_all[order]                                        # [K, n, C-1]
        self.w_row = (w_epoch * inv_norm).unsqueeze(2)                                  # [K, n, 1]
        self.w_epoch, self.inv_norm = w_epoch, inv_norm

    def gradient(self, Z, lo, hi):
        return torch.sigmoid(Z).sub_(self.above_epoch[:, lo:hi]).mul_(self.w_row[:, lo:hi])

    def epoch_scores(self, Z):
        K, n = Z.shape[:2]
        per = coral_loss(Z, self.above_epoch) * self.w_epoch * self.inv_norm
        pred = ordinal_group_probs(Z.reshape(K * n, -1)).reshape(K, n, self.data.n_classes).argmax(2)
        return per, pred, {}

    def validate(self, z, y, w, k, lo, hi):
        above = (y.unsqueeze(1) > torch.arange(z.shape[1], device=z.device)).float()
        return coral_loss(z, above) * w, ordinal_group_probs(z).argmax(1), 0.0


class AgeTarget(Target):
    """Regression of the standardized age with the Huber loss; groups from the age and the group edges."""

    def __init__(self, data, configs, weights):
        super().__init__(data, configs, weights)
        self.age_shift = float(data.train_age.mean())
        self.age_scale = float(data.train_age.std().clamp_min(1.0))
        self.target_all = (data.train_age - self.age_shift) / self.age_scale           # [n]
        self.beta = HUBER_YEARS / self.age_scale
        self.thresholds = age_thresholds(data.group_edges, self.device)

    def start_epoch(self, order, grp_epoch, w_epoch, inv_norm):
        self.tgt_epoch = self.target_all[order]                                         # [K, n]
        self.w_over = (w_epoch * inv_norm / self.beta).unsqueeze(2)                     # [K, n, 1]
        self.w_epoch, self.inv_norm = w_epoch, inv_norm

    def gradient(self, Z, lo, hi):
        return (Z - self.tgt_epoch[:, lo:hi].unsqueeze(2)).clamp_(-self.beta, self.beta).mul_(self.w_over[:, lo:hi])

    def epoch_scores(self, Z):
        n = Z.shape[1]
        r = Z[:, :, 0] - self.tgt_epoch
        per = huber(r, self.beta) * self.w_epoch * self.inv_norm                        # batch-mean terms
        pred = ((Z[:, :, 0] * self.age_scale + self.age_shift).unsqueeze(2) > self.thresholds).sum(2)
        return per, pred, {"train_mae": ((r.abs() * self.age_scale).sum(1) / n).tolist()}

    def validate(self, z, y, w, k, lo, hi):
        r = z[:, 0] - (self.data.val_age[lo:hi] - self.age_shift) / self.age_scale
        pred = ((z[:, 0] * self.age_scale + self.age_shift).unsqueeze(1) > self.thresholds).sum(1)
        return huber(r, self.beta) * w, pred, float((r.abs() * self.age_scale).sum())

    def finish(self, result):
        result.age_shift, result.age_scale = self.age_shift, self.age_scale


TARGET_CLASSES = {"group": GroupTarget, "soft": SoftTarget, "ordinal": OrdinalTarget, "age": AgeTarget}


def make_target(name: str, data: HeadData, configs: list, weights: torch.Tensor) -> Target:
    if name in AGE_TARGETS and bool((data.train_age < 0).any() or (data.val_age < 0).any()):
        raise ValueError(missing_ages_message(name))
    return TARGET_CLASSES[name](data, configs, weights)
