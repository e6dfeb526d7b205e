"""Entry point of the ``kubetune`` command: global options, sub-commands, error handling."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import openai
import typer
from typer.core import TyperGroup

from kubetune.version import __version__
from kubetune_cli import files, jobs, models, serve
from kubetune_cli.context import DEFAULT_BASE_URL, Connection, connection, local_mode_key
from kubetune_cli.errors import (
    ExitCode,
    describe_connection_error,
    describe_status_error,
    fail,
)


class ApiErrorsGroup(TyperGroup):
    """Turns API and network errors from any sub-command into a message and an exit code.

    One place for it, so no command can leak a traceback for an error the user can act on.
    """

    # ``ctx`` is typer's vendored click Context, which typer does not export under a public
    # name; Any keeps the override compatible without importing a private module.
    def invoke(self, ctx: Any) -> Any:
        """Run the command; map OpenAI SDK errors to :class:`ExitCode`."""
        try:
            return super().invoke(ctx)
        except openai.APIStatusError as exc:
            fail(describe_status_error(exc), ExitCode.API_ERROR)
        except openai.APIConnectionError as exc:
            fail(describe_connection_error(exc, _base_url(ctx)), ExitCode.UNREACHABLE)


def _base_url(ctx: Any) -> str:
    conn = ctx.obj
    return conn.base_url if isinstance(conn, Connection) else DEFAULT_BASE_URL


app = typer.Typer(
    cls=ApiErrorsGroup,
    help="kubetune: fine-tune open models through an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(files.app, name="files")
app.add_typer(jobs.app, name="jobs")
app.add_typer(models.app, name="models")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"kubetune {__version__}")
        raise typer.Exit()


@app.callback()
def global_options(
    ctx: typer.Context,
    base_url: Annotated[
        str, typer.Option(envvar="KUBETUNE_BASE_URL", help="The API's base URL, …/v1.")
    ] = DEFAULT_BASE_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar=["KUBETUNE_API_KEY", "OPENAI_API_KEY"],
            show_envvar=True,
            help="API key (default: local mode's generated key when the URL is on this host).",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds per request.")] = 600.0,
    max_retries: Annotated[
        int, typer.Option(min=0, help="Retries of failed requests (the SDK's backoff).")
    ] = 2,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show version.")
    ] = False,
) -> None:
    """Global options; every command talks to the API at --base-url."""
    base_url = base_url.rstrip("/")
    ctx.obj = Connection(
        base_url=base_url,
        api_key=api_key or local_mode_key(base_url),
        timeout=timeout,
        max_retries=max_retries,
    )


@app.command("serve")
def serve_command(
    ctx: typer.Context,
    kubernetes: Annotated[
        bool, typer.Option("--kubernetes", help="Run the API against a cluster, not locally.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option(help="Local mode: where files, jobs and models live.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port.")] = None,
    no_vllm: Annotated[
        bool, typer.Option("--no-vllm", help="Local mode: do not start vLLM.")
    ] = False,
    model: Annotated[
        Path | None,
        typer.Option(
            help="Local mode: a Hugging Face model folder to fine-tune and serve, or the name "
            "of one added with `models add`."
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Local mode: --model's name (default: the folder's).")
    ] = None,
    kubeconfig: Annotated[
        Path | None, typer.Option(help="Kubernetes mode: kubeconfig (default: in-cluster).")
    ] = None,
    namespace: Annotated[
        str | None, typer.Option(help="Kubernetes mode: namespace of the FineTuneJobs.")
    ] = None,
) -> None:
    """Start kubetune: local mode (default, no cluster needed) or --kubernetes."""
    if kubernetes:
        if data_dir is not None or no_vllm or model is not None or model_name is not None:
            raise typer.BadParameter(
                "--data-dir, --no-vllm, --model and --model-name are local-mode options"
            )
        argv, env = serve.kubernetes_command(
            kubeconfig=kubeconfig, namespace=namespace, host=host, port=port
        )
        serve.exec_server(argv, env)
        return
    if kubeconfig is not None or namespace is not None:
        raise typer.BadParameter("--kubeconfig and --namespace need --kubernetes")
    serve.exec_server(
        serve.local_command(
            data_dir=data_dir,
            host=host,
            port=port,
            no_vllm=no_vllm,
            model=model,
            model_name=model_name,
        )
    )


def main() -> None:
    """Run the command line."""
    try:
        app()
    except KeyboardInterrupt:
        # Outside `jobs watch` (which says what it stopped), Ctrl-C ends quietly.
        raise SystemExit(int(ExitCode.INTERRUPTED)) from None


__all__ = ["app", "connection", "main"]
