"""The one way every Portcullis block is loaded: a saved block by name, or the environment."""

from __future__ import annotations

from typing import Any, ClassVar, Self

from prefect.blocks.core import Block
from pydantic import ValidationError, create_model
from pydantic_settings import BaseSettings, SettingsConfigDict

from portcullis.errors import ConfigurationError


class EnvBlock(Block):
    """A block whose fields can also come from ``<_env_prefix><FIELD>`` environment variables.

    Subclasses set ``_env_prefix`` and ``_env_hint`` (what to do when it is not configured).
    """

    _env_prefix: ClassVar[str]
    _env_hint: ClassVar[str] = "set the environment variables, or name a saved block"

    @classmethod
    def from_env(cls) -> Self:
        """Read this block's fields from the environment (pydantic-settings)."""
        fields: dict[str, Any] = {
            name: (info.annotation, info) for name, info in cls.model_fields.items()
        }
        settings_cls = create_model(
            f"{cls.__name__}Settings", __base__=BaseSettings, __config__=None, **fields
        )
        settings_cls.model_config = SettingsConfigDict(env_prefix=cls._env_prefix, extra="ignore")
        try:
            return cls(**settings_cls().model_dump())
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls._env_prefix}{'_'.join(str(p) for p in err['loc']).upper() or '*'}: "
                f"{err['msg']}"
                for err in exc.errors()
            )
            raise ConfigurationError(
                f"{cls.__name__} not configured: {problems}", hint=cls._env_hint
            ) from None

    @classmethod
    def resolve(cls, block_name: str | None) -> Self:
        """Load the saved block ``block_name``, or from the environment when it is None."""
        if block_name is None:
            return cls.from_env()
        try:
            loaded = cls.load(block_name)
        except ValueError as exc:
            raise ConfigurationError(
                f"{cls.__name__} block {block_name!r} cannot be loaded: {exc}",
                hint="create it in the Prefect UI (Blocks) or with the Python API",
            ) from None
        if not isinstance(loaded, cls):  # load() is typed loosely (sync or async callers)
            raise ConfigurationError(f"block {block_name!r} is not a {cls.__name__}")
        return loaded
