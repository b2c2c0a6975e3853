"""Typed trainer configuration: YAML files plus dotted ``key=value`` overrides.

One format is shared by ``python -m trainer``, the search objective and exported configs.
Every error is a ``ConfigError`` with a one-line message naming the source, the key and what is allowed.
The allowed names of data sets, architectures, surrogates, lambda schedules and optimizers are read from
their registries, so adding one is one registered entry (none of those modules imports this one).
"""

from __future__ import annotations

import copy
import stat
import typing
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import PydanticCustomError
from torch import nn

from trainer.data import DATASETS
from trainer.errors import UserError, quote
from trainer.imports import IMPORT_PATH, imported
from trainer.models import ARCHS, NeuronFactory, Stem
from trainer.neuron import LIF, Reset
from trainer.optim import OPTIMIZERS
from trainer.schedule import SCHEDULES
from trainer.surrogate import Name as SurrogateName

# The allowed names, each read from its registry (pydantic's error for a bad one lists them)
DataName = DATASETS.literal()
StemName = Literal[("auto", *typing.get_args(Stem))]  # auto: the architecture's
ScheduleName = Literal[tuple(SCHEDULES)]
OptimizerName = OPTIMIZERS.literal()


class ConfigError(UserError):
    """A bad config file, key or value; the message is one line."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    name: DataName = Field("digits", description="data set")
    root: str = Field("data", description="folder the data sets are read from (and downloaded into)")
    download: bool = Field(False,
        description="download the data set into `root` (MNIST, CIFAR-10/100, CIFAR10-DVS)")
    timesteps: int = Field(4, ge=1, description="timesteps T")
    encoding: Literal["direct", "poisson"] = Field("direct",
        description="direct: the image at every timestep; poisson: spikes drawn with the pixel value as "
                    "probability")
    batch_size: int = Field(64, ge=1, description="samples per training step")
    num_workers: int | None = Field(None, ge=0,
        description="DataLoader sets (ImageNet, DVS); None: min(8, cores)")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="0: train on all of it (final retraining)")
    image_size: int = Field(224, ge=8, description="ImageNet crop, DVS frame side")
    cutout: int = Field(0, ge=0, description="side of a zeroed square per training image (CIFAR); 0: off")
    limit: int | None = Field(None, ge=1, description="samples per split (null: all)")


def _arch(value: Any) -> str:
    if isinstance(value, str) and (value in ARCHS or IMPORT_PATH.fullmatch(value)):
        return value
    raise PydanticCustomError("arch", f"not a registered architecture or an import path (allowed: "
                              f"{', '.join(map(repr, ARCHS))}, or package.module:builder)")


class ModelConfig(Section):
    arch: Annotated[str, PlainValidator(_arch)] = Field("resnet20",
        description="a registered architecture (spiking ResNets, VGG-11/16) or an import path "
                    "`package.module:builder` (see Bring your own model)")
    kwargs: dict[str, Any] = Field(default_factory=dict,
        description="passed to the builder (an import path's, or ours)")
    neurons: list[Annotated[str, Field(pattern=IMPORT_PATH.pattern)]] = Field(default_factory=list,
        description="import paths of your own spiking neuron classes, which the diagnostics hook besides "
                    "ours and SpikingJelly's")
    width: int | None = Field(None, ge=1, description="the built-in architectures'")
    stem: StemName = Field("auto", description="the built-in ResNets'")
    compile: Literal["auto", "always", "never"] = Field("auto",
        description="the whole training step; auto: on CUDA")

    def build(self, num_classes: int, in_channels: int, neuron: NeuronFactory) -> nn.Module:
        """The backbone (no heads) as configured: a registered architecture with our LIF neurons, or what the
        builder at an import path returns for ``builder(num_classes=..., in_channels=..., **kwargs)``."""
        if self.arch in ARCHS:
            return ARCHS[self.arch](num_classes, in_channels, neuron, self.width, self.stem)
        return imported(self.arch, "model.arch")(num_classes=num_classes, in_channels=in_channels, **self.kwargs)

    def neuron_classes(self) -> tuple[type, ...]:
        """``model.neurons``: the user's spiking neuron classes, which diagnostics hook besides ours."""
        return tuple(imported(path, "model.neurons") for path in self.neurons)


class NeuronConfig(Section):
    decay: float = Field(0.25, ge=0, le=1, description="membrane decay per timestep (= 1 - 1/tau)")
    threshold: float = Field(0.5, gt=0, description="firing threshold")
    reset: Reset = Field("hard", description="hard: to 0; soft: minus the threshold")
    detach_reset: bool = Field(False, description="no gradient through the reset")
    surrogate: SurrogateName = Field("atan", description="surrogate gradient (trainer/surrogate.py); atan trains "
                                     "deep nets best with heads (docs/benchmarks/depth.md)")
    alpha: float = Field(1.0, gt=0, description="surrogate sharpness (atan: peak alpha/2; rectangle: width 1/alpha)")
    backend: Literal["fused", "loop"] = Field("fused",
        description="fused: one autograd function with a hand-written backward through time; loop: the "
                    "plain per-timestep reference")
    compile: Literal["auto", "always", "never"] = Field("auto",
        description="torch.compile the LIF loops; auto: on CUDA only")

    def factory(self, cuda: bool) -> NeuronFactory:
        """LIF layers as configured; ``compile: auto`` compiles the fused path on CUDA only."""
        compile_ = self.compile == "always" or (self.compile == "auto" and cuda)
        return partial(LIF, self.decay, self.threshold, self.reset, self.detach_reset, self.surrogate,
                       self.alpha, self.backend, compile_)


class HeadsConfig(Section):
    exits: list[str] = Field(default_factory=list,
        description="modules (names from `named_modules()`) that carry a head, e.g. [layer1.0, layer2.1]; "
                    "`default`: the architecture's stage ends; list them with `snn-train --list-exits`")
    hidden: int = Field(0, ge=0,
        description="0: global pool + linear; > 0: a 1x1 conv + BN + LIF of this many channels first")
    tokens: Literal["nd", "dn"] = Field("nd",
        description="4-D [T, B, a, b] exits: [T, B, N, D] (timm) or [T, B, D, N] (Spikformer)")


class LambdaConfig(Section):
    schedule: ScheduleName = Field("cosine", description="the curve from start to end")
    start: float = Field(1.0, ge=0, le=1, description="lambda at the first epoch")
    end: float = Field(0.0, ge=0, le=1, description="lambda once the decay is over")
    fraction: float = Field(1.0, ge=0, le=1,
        description="share of training over which lambda moves from start to end")
    rate: float = Field(5.0, gt=0, description="rate of the exponential schedule")
    steps: int = Field(3, ge=1, description="steps of the step schedule")
    table: list[Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=list,
        description="schedule table's knots")


class OptimConfig(Section):
    name: OptimizerName = Field("sgd", description="optimizer")
    lr: float = Field(0.1, gt=0, description="learning rate (cosine schedule over the epochs)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="decoupled (AdamW) or L2 (SGD) weight decay")
    epochs: int = Field(20, ge=1, description="training epochs")
    amp: bool = Field(True, description="bf16 autocast on CUDA")


class RunConfig(Section):
    seed: int = Field(0, description="of the weights, the data order and every draw of training")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:N")
    out_dir: str | None = Field(None, description="folder for model.pt and last.pt (null: write none)")
    resume: bool = Field(False, description="continue from out_dir/last.pt")
    grad_stats: bool = Field(True, description="per-epoch gradient and firing-rate diagnostics")


class Config(Section):
    data: DataConfig = Field(default_factory=DataConfig, description="data set, encoding and batches")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the spiking network")
    neuron: NeuronConfig = Field(default_factory=NeuronConfig,
        description="the LIF neuron and its surrogate gradient")
    heads: HeadsConfig = Field(default_factory=HeadsConfig, description="shortcut heads")
    lambda_: LambdaConfig = Field(default_factory=LambdaConfig, alias="lambda",
        description="the balance coefficient lambda over the epochs")
    optim: OptimConfig = Field(default_factory=OptimConfig,
        description="optimizer, learning rate, epochs, mixed precision")
    run: RunConfig = Field(default_factory=RunConfig,
        description="seed, device, output folder, resume, diagnostics")
    provenance: dict[str, Any] | None = Field(None,
        description="where an exported config came from; not used for training")

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _allowed(model: type[BaseModel], loc: tuple) -> str:
    """Field names at ``loc`` (for unknown-key errors)."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None
        )
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        model = field.annotation
    return ", ".join(f.alias or name for name, f in model.model_fields.items())


def _one_line(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{key}' (allowed: {_allowed(Config, first['loc'])})"
    return f"{source}: bad value for '{key}': {first['msg']} (got {quote(first.get('input'))})"


def build(data: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, source)) from None
    if cfg.data.cutout and cfg.data.name not in ("cifar10", "cifar100"):
        raise ConfigError(f"{source}: bad value for 'data.cutout': cutout is for cifar10 and cifar100 "
                          f"(got {cfg.data.cutout} with data.name={cfg.data.name})")
    if (cfg.lambda_.schedule == "table") != bool(cfg.lambda_.table):
        raise ConfigError(f"{source}: bad value for 'lambda.table': the knots of lambda.schedule table, and only "
                          f"of it (got {quote(cfg.lambda_.table)} with lambda.schedule={cfg.lambda_.schedule})")
    if cfg.model.kwargs and cfg.model.arch in ARCHS:
        raise ConfigError(f"{source}: bad value for 'model.kwargs': it is for a builder at an import path; "
                          f"{cfg.model.arch} takes model.width and model.stem (got {quote(cfg.model.kwargs)})")
    return cfg  # the model itself (import, exits, output shape) is checked on a dry run: trainer.probe


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a nested dict, creating sections as needed."""
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override: '{key}' goes through '{part}', which is not a section")
    node[leaf] = value


def with_values(data: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``data`` with each dotted ``key: value`` of ``values`` set."""
    data = copy.deepcopy(data)
    for key, value in values.items():
        set_dotted(data, key, value)
    return data


def parse_override(item: str) -> tuple[str, Any]:
    """``key=value`` with the value parsed as YAML (so ``3``, ``0.1``, ``[a, b]`` and ``true`` work)."""
    if "=" not in item:
        raise ConfigError(f"override: '{item}' is not key=value")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except (yaml.YAMLError, ValueError) as err:
        raise ConfigError(f"override: '{key.strip()}': not a YAML value ({str(err).splitlines()[0][:120]})") from None


MAX_FILE_BYTES = 1 << 20  # a config or space file is a few KB; anything near a megabyte is a mistake
MAX_VALUES = 100_000  # values after YAML's aliases are expanded: a nested alias bomb stops here


def _expanded_size(data: Any, limit: int) -> int:
    """How many values ``data`` holds once its aliases are expanded (PyYAML shares an alias's object, so the
    count is memoised per object and never walks the expansion), stopping past ``limit``."""
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        sizes[id(node)] = total
        return total

    return size(data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a regular file of at most ``MAX_FILE_BYTES`` that expands to at most
    ``MAX_VALUES`` values: a directory, FIFO or device, a huge file or an alias bomb is one line, read in
    bounded time and memory."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(f"{path}: cannot read (not a regular file: a directory, FIFO or device)")
    if info.st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {info.st_size} bytes; a config or space file is at most {MAX_FILE_BYTES}")
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except (ValueError, RecursionError) as err:  # an integer of more digits than Python converts; deep nesting
        raise ConfigError(f"{path}: not valid YAML ({(str(err).splitlines() or [type(err).__name__])[0][:120]})") from None
    if _expanded_size(data, MAX_VALUES) > MAX_VALUES:
        raise ConfigError(f"{path}: expands to more than {MAX_VALUES} values (nested YAML aliases?)")
    return data if data is not None else {}


def load(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then each ``key=value`` override, validated once."""
    data = read_yaml(path) if path else {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        set_dotted(data, *parse_override(item))
    return build(data, str(path) if path else "config")
