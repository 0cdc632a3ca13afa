"""Parameter types the commands share."""

from __future__ import annotations

from typing import Any

import click

__all__ = ["PathParam"]


class PathParam(click.Path):
    """A path argument or option that refuses an empty value: click turns ``""`` into
    ``.``, so an empty argument (an unset shell variable, say) would quietly name the
    current directory, where ``demo --path`` then made a bus."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("an empty path names nothing; give one ('.' for the current directory)",
                      param, ctx)
        return super().convert(value, param, ctx)
