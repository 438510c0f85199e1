"""What every quantizer shares: settings (a :class:`~labkit.config.spec.QuantSpec`), a grid, state, commands.

A quantizer holds one grid (:mod:`labkit.quant.grids`: PACT clip bounds or a TQT log2 threshold), chosen from
its spec at construction; the grid registers the bound parameters on the quantizer and does the bound
arithmetic. Two states kept in persistent buffers (``started_flag``, ``frozen_flag``): before ``start`` a
quantizer runs in float (activations also gather statistics in training mode); after ``start`` it
fake-quantizes. ``freeze`` stops the bounds from learning (they are detached in forward); ``thaw`` undoes it;
``stop`` returns to float.

``start`` initialises the bounds by ``init_clip`` (rules in :mod:`labkit.quant.init`); symmetric grids take
m = max(|lo|, |hi|) of the rule's range, except ``const`` where m = ``init_clip_hi``. Every symmetric grid,
``sawb_symm`` included, is almost symmetric: zero must be a code of an integer network (the reference puts
``sawb_symm`` on the exactly symmetric [-m, m], eps = 2m / (n - 1), where an even n has no zero). Weight
bounds that are not learned follow the weights (:meth:`labkit.quant.layers.PACTConv2d.refresh_bounds`). With
``learn_clip`` the bound parameters receive the PACT gradients (or the TQT log2 t gradient) once started; the
raw TQT gradient is normalised by :func:`labkit.quant.optimizers.normalize_tqt_grads`, which the training loop
calls right before each optimizer step. ``requires_grad`` of bound parameters is ``learn_clip`` and never
changes (DDP registers parameters once); frozen or not-yet-started bounds are simply not used with autograd.
"""

from __future__ import annotations

import torch
from torch import nn

from labkit.config.spec import QuantSpec
from labkit.quant.functional import EPS_MIN
from labkit.quant.grids import make_grid


def _setting(name: str) -> property:
    return property(lambda self: getattr(self._spec, name), doc=f"``self.spec.{name}``")


class QuantizerBase(nn.Module):
    """Common state, bounds and commands of every quantizer (see module docstring).

    Subclasses call :meth:`_setup_quantizer` in ``__init__`` and implement :meth:`_raw_init_bounds`. The
    spec's settings read as attributes (``q.n_levels``, ``q.tqt``, ``q.signed``, ...); assigning ``q.spec``
    changes them (the kind of grid must stay: PACT or TQT, sign, symmetry).
    """

    n_levels, bits, signed, symm = map(_setting, ("n_levels", "bits", "signed", "symm"))
    tqt, pow2, tqt_beta, tqt_clip_grad = map(_setting, ("tqt", "pow2", "tqt_beta", "tqt_clip_grad"))
    init_clip, init_clip_lo, init_clip_hi = map(_setting, ("init_clip", "init_clip_lo", "init_clip_hi"))
    nb_std, learn_clip, rounding, noisy = map(_setting, ("nb_std", "learn_clip", "rounding", "noisy"))

    def _setup_quantizer(self, spec: QuantSpec, clip_shape: tuple = ()) -> None:
        self._spec, self.grid = spec, make_grid(spec, clip_shape)
        self.grid.create(self, spec)
        self.register_buffer("started_flag", torch.tensor(False))
        self.register_buffer("frozen_flag", torch.tensor(False))
        self._started = self._frozen = False

    @property
    def spec(self) -> QuantSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: QuantSpec) -> None:
        grid = make_grid(spec, self.grid.shape)
        if type(grid) is not type(self.grid) or grid.symmetric != self.grid.symmetric:
            raise ValueError(f"{type(self).__name__}: a spec with another kind of grid "
                             f"({type(grid).__name__}, not {type(self.grid).__name__}) needs a new quantizer")
        self._spec, self.grid = spec, grid

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._started, self._frozen = bool(self.started_flag), bool(self.frozen_flag)

    # ------------------------------------------------------------------ state and commands
    @property
    def started(self) -> bool:
        return self._started

    @property
    def frozen(self) -> bool:
        return self._frozen

    def _set_flags(self, started: bool | None = None, frozen: bool | None = None) -> None:
        if started is not None:
            self._started = bool(started)
            self.started_flag.fill_(self._started)
        if frozen is not None:
            self._frozen = bool(frozen)
            self.frozen_flag.fill_(self._frozen)

    def clip_parameters(self) -> list[nn.Parameter]:
        """The bound parameters (``clip_lo``/``clip_hi`` or ``log2_t``)."""
        return [getattr(self, n) for n in self.grid.param_names]

    @torch.no_grad()
    def start(self, init_clip_hi: float | None = None, init_clip_lo: float | None = None) -> None:
        """Initialise the bounds by ``init_clip`` and begin fake-quantizing. No-op when already started
        (so re-applying a schedule after a resume keeps learned bounds). ``init_clip_hi``/``_lo`` override
        the ``const`` values."""
        if self._started:
            return
        given = {k: v for k, v in (("init_clip_hi", init_clip_hi), ("init_clip_lo", init_clip_lo))
                 if v is not None}
        if given:
            self.spec = self.spec.replace(**given)
        lo, hi = self._raw_init_bounds()
        if self.init_clip == "const" and self.grid.symmetric:
            lo = -hi  # symmetric grids: const gives m = init_clip_hi
        self.grid.store(self, lo, hi)
        self._set_flags(started=True)

    def freeze(self) -> None:
        """Bounds stop learning (detached in forward; gradients cleared)."""
        self._set_flags(frozen=True)
        for p in self.clip_parameters():
            p.grad = None

    def thaw(self) -> None:
        self._set_flags(frozen=False)

    def stop(self) -> None:
        """Back to float; bounds are kept (a later ``start`` re-initialises them)."""
        self._set_flags(started=False)

    def _raw_init_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------------ bounds
    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1 if self.grid.shape else ())

    def get_clip(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Effective (lo, hi) as detached tensors of shape ``()`` (per layer) or ``(C,)`` (per channel)."""
        lo, hi = self.grid.bounds(self)
        return self._flat(lo), self._flat(torch.maximum(hi, lo + self.grid.tiny))

    def get_eps(self) -> torch.Tensor:
        """``eps = (hi - lo) / (n_levels - 1)`` of the effective bounds (TQT: the scale), at least EPS_MIN."""
        return self._flat(self.grid.eps(self))

    @torch.no_grad()
    def set_eps(self, eps) -> None:
        """Set the bounds so that ``get_eps() == eps`` (unsigned: hi = (n-1) eps; symmetric: m = floor(n/2)
        eps; asymmetric: lo kept, hi = lo + (n-1) eps; TQT: log2 t = log2(eps D), pow2: ceil(log2 eps))."""
        self.grid.set_eps(self, torch.as_tensor(eps, dtype=torch.float32, device=self.started_flag.device)
                          .clamp(min=EPS_MIN))

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize x with the current bounds (regardless of ``started``)."""
        return self.grid.fake_quant(self, x, self._spec.learn_clip and not self._frozen)

    def quant_summary(self) -> dict:
        """JSON-friendly floats: lo, hi, eps, n_levels (and log2_t with TQT); per channel: means plus
        hi_min / hi_max (and lo_min / lo_max)."""
        lo, hi = self.get_clip()
        vals = {"lo": lo, "hi": hi, "eps": self.get_eps(), **self.grid.summary(self)}
        out: dict = {"n_levels": int(self.n_levels)}
        out.update({k: float(self._flat(v).float().mean()) for k, v in vals.items()})
        if hi.numel() > 1:
            out.update(hi_min=float(hi.min()), hi_max=float(hi.max()), lo_min=float(lo.min()),
                       lo_max=float(lo.max()))
        return out

    def _quant_repr(self) -> str:
        return (f"n_levels={self.n_levels}, init_clip={self.init_clip!r}, learn_clip={self.learn_clip}"
                f"{self.grid.describe()}")


def quantizers(net: nn.Module) -> list[tuple[str, QuantizerBase]]:
    """``(name, module)`` of every quantizer in ``net`` (layers, activations, adder inputs/outputs)."""
    return [(n, m) for n, m in net.named_modules() if isinstance(m, QuantizerBase)]


def quant_summaries(net: nn.Module) -> dict[str, dict]:
    """``{module_name: quant_summary()}`` of every quantizer (adders': ``name.acts.i`` / ``name.act_out``)."""
    return {n: m.quant_summary() for n, m in quantizers(net)}
