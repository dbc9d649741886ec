"""Optimizers: AdamW/Adam (fused where the parameters allow it), 8-bit Adam, Prodigy, and a CPU
offload wrapper that keeps an optimizer's state off the GPU."""

from __future__ import annotations

import torch

from cogtune.config.training import OptimizerArgs, ScheduleArgs
from cogtune.errors import CogtuneError

# Bytes of optimizer state per trainable parameter, for the memory estimate (Prodigy keeps four
# fp32 tensors per parameter; 8-bit Adam two one-byte tensors, plus block statistics not counted).
STATE_BYTES = {"adam": 8, "adamw": 8, "prodigy": 16, "adam8bit": 2}


def state_bytes_per_parameter(config: OptimizerArgs) -> int:
    if config.optimizer != "prodigy" and config.use_8bit_adam:
        return STATE_BYTES["adam8bit"]
    return STATE_BYTES[config.optimizer]


def make_optimizer(parameters, config: OptimizerArgs, learning_rate: float, offload: bool = False):
    """The optimizer of --optimizer for the parameters. offload (--offload_optimizer): its state lives in
    CPU memory (TrainConfig refuses it with fp16 and with 8-bit Adam)."""
    parameters = list(parameters)
    if offload:
        return CPUOffloadOptimizer(parameters, lambda cpu_parameters: _make(cpu_parameters, config, learning_rate))
    return _make(parameters, config, learning_rate)


def _make(parameters: list, config: OptimizerArgs, learning_rate: float):
    betas = (config.adam_beta1, config.adam_beta2)
    if config.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise CogtuneError("--optimizer prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return prodigyopt.Prodigy(
            parameters, lr=learning_rate, betas=betas, beta3=config.prodigy_beta3, eps=config.adam_epsilon,
            weight_decay=config.adam_weight_decay, decouple=config.prodigy_decouple,
            use_bias_correction=config.prodigy_use_bias_correction,
            safeguard_warmup=config.prodigy_safeguard_warmup,
        )
    if config.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise CogtuneError("--use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes") from None
        cls = bnb.optim.AdamW8bit if config.optimizer == "adamw" else bnb.optim.Adam8bit
        return cls(parameters, lr=learning_rate, betas=betas, eps=config.adam_epsilon,
                   weight_decay=config.adam_weight_decay)
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    # One fused kernel per step instead of a loop over tensors, where every parameter allows it.
    fused = all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for p in parameters)
    return cls(parameters, lr=learning_rate, betas=betas, eps=config.adam_epsilon,
               weight_decay=config.adam_weight_decay, fused=fused or None)


class CPUOffloadOptimizer(torch.optim.Optimizer):
    """Runs an optimizer on fp32 CPU copies of the parameters, so that its state (two tensors per
    parameter for Adam) never takes GPU memory. Each step copies the gradients to pinned CPU
    memory, steps there, and copies the new values back. param_groups and state are the inner
    optimizer's, so learning-rate schedules and checkpoints see it as that optimizer."""

    def __init__(self, parameters: list, make_inner):
        self.parameters = parameters
        pin = torch.cuda.is_available()
        self.cpu_parameters = [torch.nn.Parameter(p.detach().to("cpu", torch.float32, copy=True)) for p in parameters]
        self.cpu_gradients = [torch.empty_like(p, pin_memory=pin) for p in self.cpu_parameters]
        self.inner = make_inner(self.cpu_parameters)
        # Not Optimizer.__init__: this optimizer has no parameter groups of its own.
        self.defaults, self.param_groups, self.state = self.inner.defaults, self.inner.param_groups, self.inner.state
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @torch.no_grad()
    def step(self, closure=None):
        for parameter, cpu_parameter, cpu_gradient in zip(self.parameters, self.cpu_parameters, self.cpu_gradients):
            if parameter.grad is None:
                cpu_parameter.grad = None
                continue
            cpu_parameter.grad = cpu_gradient.copy_(parameter.grad, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the gradients have arrived
        loss = self.inner.step(closure)
        for parameter, cpu_parameter in zip(self.parameters, self.cpu_parameters):
            parameter.copy_(cpu_parameter, non_blocking=True)
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for parameter in self.parameters:
            parameter.grad = None

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
        with torch.no_grad():  # the loaded run's parameters are set by its LoRA; keep the copies equal
            for parameter, cpu_parameter in zip(self.parameters, self.cpu_parameters):
                cpu_parameter.copy_(parameter)


def make_lr_scheduler(optimizer, config: ScheduleArgs, max_train_steps: int):
    """--lr_scheduler as the diffusers scripts build it, in optimizer steps whatever the number of
    processes: the accelerator does not step it once per process (step_scheduler_with_optimizer
    off), so a checkpoint's schedule means the same on any number of processes."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
