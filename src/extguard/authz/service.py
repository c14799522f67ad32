"""`envoy.service.auth.v3.Authorization/Check`: identity, model access and the budget pre-check.

Envoy calls Check with the request's headers (and, when the filter sets `with_request_body`, the
start of its body) before anything goes upstream. The response is one of:

- a rejection in the provider's error format: 401 when no configured tenant can be identified,
  403 when the tenant may not call the model, 429 with `retry-after` when a hard limit of one of
  its windows is reached, or 503 when the budget store cannot be reached and its failure mode is
  `closed`;
- OK, with `x-extguard-tenant` and `x-extguard-user` set for the upstream and the ext_proc stage
  (client-sent copies are removed, so nobody can claim another tenant), the same and the budget
  state (`ok`, `soft_limit`, `unchecked` or `none`) in dynamic metadata under `extguard`, the
  tenant's `rate_limits` in dynamic metadata for Envoy's rate limiter, and
  `x-extguard-budget-warning` for the client at a soft limit.

Without a `tenancy` section in the policy, every request is OK and nothing is added.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as auth
from envoy.service.auth.v3 import external_auth_pb2_grpc as auth_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import json_format, struct_pb2
from opentelemetry import trace
from opentelemetry.trace import NoOpTracer, SpanKind, Status, StatusCode, Tracer
from google.rpc import code_pb2, status_pb2

from extguard.authz.identity import Caller, Identifier, UnknownCaller
from extguard.budget.keeper import BudgetKeeper
from extguard.config.tenancy import Tenancy
from extguard.llm.apis import OPENAI_CHAT, Api, api_for_path
from extguard.telemetry.logs import audit, bind_request
from extguard.telemetry.metrics import Metrics
from extguard.telemetry.tracing import SPAN_AUTHZ, parent_context, set_attributes

log = logging.getLogger("extguard.authz")

TENANT_HEADER = "x-extguard-tenant"
USER_HEADER = "x-extguard-user"
WARNING_HEADER = "x-extguard-budget-warning"
BUDGET_HEADER = "x-extguard-budget"  # "unchecked" when the store was down and the mode is open
# Headers that only extguard may set on the way upstream.
OWN_HEADERS = (TENANT_HEADER, USER_HEADER, BUDGET_HEADER)
METADATA_NAMESPACE = "extguard"
# A model named by Envoy AI Gateway's router before the body is read.
MODEL_HEADER = "x-ai-eg-model"

ERROR_CODE_UNAUTHENTICATED = "extguard_unknown_tenant"
ERROR_CODE_FORBIDDEN = "extguard_model_not_allowed"
ERROR_CODE_BUDGET = "extguard_budget_exhausted"
ERROR_CODE_STORE = "extguard_budget_unavailable"


class Authorization(auth_grpc.AuthorizationServicer):
    def __init__(
        self, tenancy: Tenancy | None, budgets: BudgetKeeper | None, metrics: Metrics | None = None, tracer: Tracer | None = None
    ) -> None:
        self._metrics = metrics if metrics is not None else Metrics()
        self._tenancy = tenancy
        self._identifier = Identifier(tenancy) if tenancy is not None else None
        self._budgets = budgets
        self._tracer = tracer if tracer is not None else NoOpTracer()

    async def Check(self, request: auth.CheckRequest, context: grpc.aio.ServicerContext) -> auth.CheckResponse:  # noqa: N802 - gRPC method name
        http = request.attributes.request.http
        headers = {name.lower(): value for name, value in http.headers.items()}
        parent = parent_context(context.invocation_metadata(), headers if "traceparent" in headers else None)
        with self._tracer.start_as_current_span(SPAN_AUTHZ, context=parent, kind=SpanKind.SERVER) as span:
            trace_id = span.get_span_context().trace_id
            bind_request(headers.get("x-request-id", ""), format(trace_id, "032x") if trace_id else "")
            response = await self._check(request, headers)
            _describe_on_span(span, response)
            return response

    async def _check(self, request: auth.CheckRequest, headers: dict[str, str]) -> auth.CheckResponse:
        http = request.attributes.request.http
        api = api_for_path(http.path) or OPENAI_CHAT
        if self._tenancy is None or self._identifier is None:
            return _ok([], [], [], {})

        try:
            caller = self._identifier.identify(headers, request.attributes.metadata_context)
        except UnknownCaller as unknown:
            log.info("request %s rejected: %s", headers.get("x-request-id", "-"), unknown.reason)
            self._metrics.budget_decisions.labels("authz", "unknown_tenant", "").inc()
            return _denied(api, 401, f"Unauthorized: {unknown.reason}.", ERROR_CODE_UNAUTHENTICATED)

        model = headers.get(MODEL_HEADER) or _model_from_body(http)
        tenant = self._tenancy.tenants[caller.tenant]
        if not tenant.allows_model(model):
            log.info("request %s rejected: tenant %s may not call model %s", headers.get("x-request-id", "-"), caller.tenant, model)
            self._metrics.budget_decisions.labels("authz", "model_not_allowed", self._metrics.tenant(caller.tenant)).inc()
            return _denied(api, 403, f"Tenant {caller.tenant!r} may not call model {model!r}.", ERROR_CODE_FORBIDDEN, tenant=caller.tenant, user=caller.user, model=model)

        upstream = [(TENANT_HEADER, caller.tenant)]
        if caller.user is not None:
            upstream.append((USER_HEADER, caller.user))
        budget_state = "none"  # no budget store
        warning: str | None = None

        if self._budgets is not None:
            check = await self._budgets.pre_check(caller.tenant, caller.user)
            if check.store_unavailable:
                self._metrics.budget_decisions.labels("authz", "store_unavailable", self._metrics.tenant(caller.tenant)).inc()
                self._metrics.failure_mode_activations.labels("authz", self._tenancy.store.failure_mode).inc()
                if self._tenancy.store.failure_mode == "closed":
                    return _denied(api, 503, "The budget service is unavailable. Retry later.", ERROR_CODE_STORE, tenant=caller.tenant, user=caller.user, model=model)
                upstream.append((BUDGET_HEADER, "unchecked"))
                budget_state = "unchecked"
            elif check.exhausted is not None:
                self._metrics.budget_decisions.labels("authz", "budget_exhausted", self._metrics.tenant(caller.tenant)).inc()
                spent = check.exhausted
                message = f"Budget exhausted: the {spent.window} {spent.metric} limit of tenant {caller.tenant!r} is reached."
                log.info("request %s rejected: %s", headers.get("x-request-id", "-"), message)
                return _denied(
                    api, 429, message, ERROR_CODE_BUDGET, retry_after_s=spent.retry_after_s, tenant=caller.tenant, user=caller.user, model=model
                )  # fmt: skip
            else:
                budget_state = "ok"
            if check.warnings:
                warning = "; ".join(check.warnings)
                budget_state = "soft_limit"

        # Client copies of the headers set here are overwritten; the others are removed. Envoy
        # applies removals after additions, so a header set here must not be removed too.
        setting = {name for name, _ in upstream}
        remove = [name for name in OWN_HEADERS if name in headers and name not in setting]
        if caller.key_header is not None and self._tenancy.identity.strip_api_key:
            remove.append(caller.key_header)
        self._metrics.budget_decisions.labels("authz", "allowed", self._metrics.tenant(caller.tenant)).inc()
        facts = {"tenant": caller.tenant, "user": caller.user or "", "identity_source": caller.source, "budget": budget_state}
        client = []
        if warning is not None:
            facts["budget_warning"] = warning
            client.append((WARNING_HEADER, warning))
        metadata: dict[str, Any] = {METADATA_NAMESPACE: facts}
        metadata.update((key, limit.metadata()) for key, limit in tenant.rate_limits.items())
        return _ok(upstream, remove, client, metadata)


def _describe_on_span(span: trace.Span, response: auth.CheckResponse) -> None:
    """Copy the decision onto the authz span: status, tenant, budget state. No identities or keys."""
    if not span.is_recording():
        return
    if response.HasField("denied_response"):
        status = int(response.denied_response.status.code)
        span.set_attributes({"http.response.status_code": status, "extguard.authz.decision": "denied"})
        span.set_status(Status(StatusCode.ERROR, f"denied with {status}"))
        return
    facts = json_format.MessageToDict(response.dynamic_metadata).get(METADATA_NAMESPACE, {})
    set_attributes(span, {
        "extguard.authz.decision": "allowed",
        "extguard.tenant": facts.get("tenant"),
        "extguard.identity_source": facts.get("identity_source"),
        "extguard.budget.state": facts.get("budget"),
    })  # fmt: skip


def _model_from_body(http: Any) -> str | None:
    """Return the "model" of a JSON body that Envoy sent along, or None."""
    raw = http.raw_body or http.body.encode("utf-8")
    if not raw:
        return None
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else None


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _ok(
    upstream: list[tuple[str, str]], remove: list[str], client: list[tuple[str, str]], metadata: dict[str, Any]
) -> auth.CheckResponse:
    """Allow the request. Envoy files `metadata` under the namespace envoy.filters.http.ext_authz."""
    response = auth.CheckResponse(status=status_pb2.Status(code=code_pb2.OK))
    ok = response.ok_response
    ok.headers.extend(_header(name, value) for name, value in upstream)
    ok.headers_to_remove.extend(remove)
    ok.response_headers_to_add.extend(_header(name, value) for name, value in client)
    if metadata:
        fields = struct_pb2.Struct()
        fields.update(metadata)
        response.dynamic_metadata.CopyFrom(fields)
    return response


def _denied(
    api: Api, status: int, message: str, code: str, *, retry_after_s: int | None = None, tenant: str | None = None,
    user: str | None = None, model: str | None = None,
) -> auth.CheckResponse:
    audit("access_denied" if status in (401, 403) else "budget_refused", stage="authz", status=status, code=code, tenant=tenant, user=user, model=model)
    rpc_code = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED, 429: code_pb2.RESOURCE_EXHAUSTED}
    response = auth.CheckResponse(status=status_pb2.Status(code=rpc_code.get(status, code_pb2.UNAVAILABLE)))
    denied = response.denied_response
    denied.status.code = http_status_pb2.StatusCode.Value(_STATUS_NAMES[status])
    denied.body = api.error_body(status, message, code).decode("utf-8")
    denied.headers.append(_header("content-type", "application/json"))
    if retry_after_s is not None:
        denied.headers.append(_header("retry-after", str(retry_after_s)))
    return response


_STATUS_NAMES = {401: "Unauthorized", 403: "Forbidden", 429: "TooManyRequests", 503: "ServiceUnavailable"}
