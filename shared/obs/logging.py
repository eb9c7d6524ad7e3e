"""structlog set-up: readable lines on a terminal, JSON lines in containers.

Bind the request id with ``structlog.contextvars.bind_contextvars(request_id=...)`` (or
:func:`bound`) and every log line inside carries it.

Every line goes through one stdlib handler on the root logger whose formatter is structlog's
:class:`~structlog.stdlib.ProcessorFormatter`: scls' own structlog lines and the stdlib
``logging`` records of the libraries (RQ, uvicorn, redis, transformers, Python warnings)
come out in the same format, so with ``SCLS_LOG_FORMAT=json`` stderr holds one JSON object
per line, a traceback included as the ``exception`` field of its line.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, cast

import structlog
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

#: The stdlib logger every scls structlog line goes through; it has the configured level,
#: while the libraries' loggers (under the root logger) log WARNING and above only.
SCLS_LOGGER = "scls"


class _SclsHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler :func:`configure_logging` installs (and replaces when called again)."""


def _service_adder(service: str) -> Processor:
    """A processor adding ``service`` to every line, whichever thread logs it (a context
    variable bound in the main thread is not seen by the heartbeat or HTTP threads)."""

    def add_service(_logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("service", service)
        return event_dict

    return add_service


def _scls_stdlib_logger(*args: Any) -> logging.Logger:
    """The stdlib logger of ``get_logger(name)``: ``scls.<name>``."""
    return logging.getLogger(f"{SCLS_LOGGER}.{args[0]}" if args else SCLS_LOGGER)


def _add_module_name(logger: WrappedLogger, _name: str, event_dict: EventDict) -> EventDict:
    """``logger``: the module that logged (``scls.`` dropped from the stdlib logger name)."""
    if isinstance(logger, logging.Logger):
        event_dict.setdefault("logger", logger.name.removeprefix(f"{SCLS_LOGGER}."))
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "INFO", service: str = "scls") -> None:
    """Configure structlog and the stdlib root logger (idempotent; call once per process,
    before the services start logging)."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    stamp = structlog.processors.TimeStamper(fmt="iso")
    common: list[Processor] = [
        structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, stamp,
        _service_adder(service),
    ]
    structlog.configure(
        processors=[*common, _add_module_name,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        # Filtered here, before any formatting: no debug line at INFO, whatever the
        # stdlib levels say.
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_scls_stdlib_logger,
        cache_logger_on_first_use=False,
    )
    final: list[Processor] = [structlog.stdlib.ProcessorFormatter.remove_processors_meta]
    if use_json:
        # The traceback as a string field of the same JSON line.
        final += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        final.append(structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback))
    handler = _SclsHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*common, structlog.stdlib.add_logger_name],
        processors=final,
    ))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _SclsHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries speak at WARNING and above (RQ and uvicorn set their own loggers' levels);
    # scls' own lines at the configured level.
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger(SCLS_LOGGER).setLevel(numeric)
    logging.captureWarnings(True)  # warnings.warn(...) -> the py.warnings logger
    _route_transformers_logging(use_json)
    if use_json:
        _log_uncaught_exceptions()


def _route_transformers_logging(use_json: bool) -> None:
    """transformers logs through a stderr handler of its own (plain text) and draws tqdm
    bars: send its records to the root handler instead, and in JSON mode drop the bars.
    Only when the process has imported it (the worker); importing it costs seconds."""
    if "transformers" not in sys.modules:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()
    if use_json:
        hf_logging.disable_progress_bar()


def _log_uncaught_exceptions() -> None:
    """An exception nothing caught (main thread or another one) is logged as one JSON line
    with its traceback, instead of Python's multi-line print."""
    log = get_logger("uncaught")

    def main_hook(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        log.critical("uncaught_exception", exc_info=(kind, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.critical("uncaught_exception", thread=getattr(args.thread, "name", None),
                     exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = main_hook
    threading.excepthook = thread_hook


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger tagged with the module name.

    Lazy: it reads the configuration at each call, so a module-level logger made at import
    time (before :func:`configure_logging` ran) still logs in the configured format and
    level, rather than structlog's defaults (console lines on stdout, debug included).
    """
    return cast(FilteringBoundLogger, structlog.get_logger(name))


@contextmanager
def bound(**values: Any) -> Iterator[None]:
    """Bind values (e.g. ``request_id``) to every log line inside the block."""
    tokens = structlog.contextvars.bind_contextvars(**values)
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
