"""What the ``posetriton`` commands share, declared once: exit codes, the one error line, the connection options
and the request-parameter options.

A command gets the connection options (``--url``, ``--timeout``, ``--retries``, TLS, ``--header``) with
:func:`connection_options`, which hands it one :class:`Connection`; and one option per request parameter its
ensemble reads with :func:`request_options`, made from the declarations in ``posetriton.core.contract`` (option
name, type, help, range), which hands it one :class:`RequestChoice`. Typer reads a command's options from its
signature, so both decorators add parameters to the signature and take their values back out of the call.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from posetriton.core.contract import ContractError, RequestParameter, parameter_groups, request_parameters

from ._core import RetryPolicy
from .grpc_client import DEFAULT_TIMEOUT_S, DEFAULT_URL, PoseClient, parse_grpc_url
from .inputs import sdk_arguments

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

Command = TypeVar("Command", bound=Callable[..., Any])


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """End the command with one ``error: ...`` line on stderr, never a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def with_options(
    keyword: str, options: Sequence[inspect.Parameter], build: Callable[..., Any]
) -> Callable[[Command], Command]:
    """A decorator: the command gains ``options`` (Typer reads them from its signature, in place of its parameter
    ``keyword``) and is called with ``keyword=build(**their values)``."""
    names = [option.name for option in options]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)  # Typer needs the annotations as objects
        own = [p for p in signature.parameters.values() if p.name != keyword]
        clashes = sorted({p.name for p in own} & set(names))
        if clashes:
            raise TypeError(f"{command.__name__} already has parameter(s) {clashes}")

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            return command(*args, **kwargs, **{keyword: build(**values)})

        run.__signature__ = signature.replace(parameters=[*own, *options])  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# ------------------------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class Connection:
    """How to reach Triton: what the connection options of every command that talks to it say."""

    url: str = DEFAULT_URL
    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = 3
    ssl: bool = False
    root_certificates: Path | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    def client_options(self) -> dict[str, Any]:
        """Keyword arguments of the SDK's clients (sync and async alike), after the URL, model and timeout."""
        return {
            "retry": RetryPolicy(attempts=self.retries), "ssl": self.ssl or self.root_certificates is not None,
            "root_certificates": self.root_certificates, "headers": dict(self.headers),
        }  # fmt: skip

    def client(self, model: str) -> PoseClient:
        return PoseClient(self.url, model, self.timeout_s, **self.client_options())


def _check_url(url: str) -> str:
    try:
        return parse_grpc_url(url)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _check_headers(values: list[str] | None) -> list[str]:
    for value in values or []:
        if ":" not in value or not value.partition(":")[0].strip():
            raise typer.BadParameter(f"{value!r} is not 'NAME: VALUE'")
    return values or []


def _connection(
    url: str, timeout: float, retries: int, ssl: bool, root_certificates: Path | None, header: list[str] | None
) -> Connection:
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header or [])}
    return Connection(url, timeout, retries, ssl, root_certificates, headers)


def connection_options(*, timeout: float = DEFAULT_TIMEOUT_S, retries: int = 3) -> Callable[[Command], Command]:
    """Give a command the connection options (with these defaults); it is called with ``connection=Connection``."""
    options = [
        _option("url", Annotated[str, typer.Option(
            help="Triton's gRPC address, HOST:PORT.", envvar="POSETRITON_URL", callback=_check_url
        )], DEFAULT_URL),
        _option("timeout", Annotated[float, typer.Option(
            min=0.1, help="Seconds to wait for each request (the gRPC deadline)."
        )], timeout),
        _option("retries", Annotated[int, typer.Option(
            min=1, help="Attempts per request when the server is unavailable (exponential backoff)."
        )], retries),
        _option("ssl", Annotated[bool, typer.Option("--ssl", help="Connect over TLS.")], False),
        _option("root_certificates", Annotated[Path | None, typer.Option(
            help="PEM file of the CA that signed the server's certificate (with --ssl).", show_default=False
        )], None),
        _option("header", Annotated[list[str] | None, typer.Option(
            "--header", "-H", metavar="NAME: VALUE", help="Extra gRPC metadata sent with every call; repeatable.",
            callback=_check_headers, show_default=False,
        )], None),
    ]  # fmt: skip
    return with_options("connection", options, _connection)


# ----------------------------------------------------------------------------------- request parameters


@dataclass(frozen=True)
class RequestChoice:
    """The request parameters given on the command line, by wire name (the ones left unset: the model's)."""

    parameters: Mapping[str, int | float]
    options: tuple[str, ...] = ()  # the command's parameter options, named in a usage error

    def checked(self, limits: Mapping[str, float | None] | None = None) -> RequestChoice:
        """Self; a value out of range (of the model's ``limits`` too, once known) is a usage error naming it."""
        try:
            request_parameters(limits=limits, **self.parameters)
        except ContractError as exc:
            fail(f"{exc} ({', '.join(self.options)})", EXIT_USAGE)
        return self

    def sdk_arguments(self, *, tracking: bool = False) -> dict[str, Any]:
        """The SDK's keyword arguments that send them (``thresholds=...``)."""
        return sdk_arguments(self.parameters, tracking=tracking)


def parameter_option(declared: RequestParameter, default: float | None = None, note: str = "") -> inspect.Parameter:
    """The option of one request parameter: its name, type, help and range come from its declaration. Its range
    is checked by the declaration (RequestChoice.checked), not by Typer, so that the message is the contract's."""
    shown = "the model's" if default is None else f"{default:g}"
    text = f"{declared.help[:1].upper()}{declared.help[1:]}, {declared.range_text()}. {note} (default: {shown})"
    option = typer.Option(declared.option, help=" ".join(text.split()), show_default=False)
    return _option(declared.name, Annotated[declared.kind | None, option], default)


def request_options(
    *, tracking: bool = False, defaults: Mapping[str, float] | None = None, notes: Mapping[str, str] | None = None
) -> Callable[[Command], Command]:
    """Give a command one option per request parameter its ensemble reads (``NAME``'s, with ``tracking``
    ``NAME_track``'s); it is called with ``request=RequestChoice``, checked but for the model's limits.
    ``defaults`` and ``notes`` (by wire name) are this command's own default and a sentence for the help."""
    groups = parameter_groups(tracking=tracking)
    declared = [d for group in groups for d in group.declarations().values()]
    options = [parameter_option(d, (defaults or {}).get(d.name), (notes or {}).get(d.name, "")) for d in declared]

    def build(**values: Any) -> RequestChoice:
        given = {name: value for name, value in values.items() if value is not None}
        return RequestChoice(given, tuple(d.option for d in declared)).checked()

    return with_options("request", options, build)
