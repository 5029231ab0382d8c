//! The [`ServerHandler`] methods of [`ProxyServer`]: every request
//! forwarded (`tools/call` through the tool stack), the client's
//! notifications passed on.

use rmcp::model::{
    CallToolRequest, CallToolRequestParams, CallToolResponse, CancelTaskParams, CancelTaskRequest,
    CancelledNotificationParam, ClientNotification, ClientRequest, CompleteRequest,
    CompleteRequestParams, CompleteResult, CustomNotification, CustomRequest, CustomResult,
    ErrorData, GetExtensions, GetMeta, GetPromptRequest, GetPromptRequestParams, GetPromptResponse,
    GetSkillRequest, GetSkillRequestParams, GetSkillResult, GetTaskParams, GetTaskRequest,
    GetTaskResult, InitializeRequestParams, InitializeResult, ListPromptsResult,
    ListResourceTemplatesResult, ListResourcesResult, ListSkillsResult, ListToolsResult,
    PaginatedRequestParams, PingRequest, ProgressNotificationParam, ReadResourceDirectoryRequest,
    ReadResourceDirectoryRequestParams, ReadResourceDirectoryResult, ReadResourceRequest,
    ReadResourceRequestParams, ReadResourceResponse, RootsListChangedNotification, ServerConfig,
    ServerResult, SubscribeRequestParams, UnsubscribeRequestParams, UpdateTaskParams,
    UpdateTaskRequest,
};
// Logging and resources/subscribe are deprecated by newer protocol versions;
// the proxy still forwards them for clients and servers that use them.
#[allow(deprecated)]
use rmcp::model::{SetLevelRequest, SetLevelRequestParams, SubscribeRequest, UnsubscribeRequest};
use rmcp::service::{NotificationContext, RequestContext, RoleClient, RoleServer};
use rmcp::ServerHandler;

use super::answers::{self, expect_result, optional, unless_cancelled};
use super::{count_request, upstream_client_config, ProxyServer};
use crate::progress::{send_in_turn, ProgressReceipt, Resolved};

#[allow(deprecated)] // resources/subscribe is legacy-only in rmcp; it is still forwarded
impl ServerHandler for ProxyServer {
    async fn initialize(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        // Counted here, and below where the proxy answers for itself; every
        // other request in `forward`.
        count_request("initialize");
        if self
            .session
            .initialized
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return Err(ErrorData::new(
                rmcp::model::ErrorCode::INVALID_REQUEST,
                "Invalid Request: this session is initialized already; open a new session \
                 to initialize again",
                None,
            ));
        }
        let result = self.initialize_session(request, context).await;
        if result.is_ok() {
            self.session
                .initialized
                .store(true, std::sync::atomic::Ordering::Release);
        }
        result
    }

    async fn ping(&self, context: RequestContext<RoleServer>) -> Result<(), ErrorData> {
        if self.core.gateway.is_some() {
            // The gateway answers for itself: its upstreams each have theirs.
            count_request("ping");
            return Ok(());
        }
        let request = ClientRequest::PingRequest(PingRequest {
            method: Default::default(),
            extensions: Default::default(),
        });
        self.forward_empty(request, context).await
    }

    async fn complete(
        &self,
        request: CompleteRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CompleteResult, ErrorData> {
        let request = ClientRequest::CompleteRequest(CompleteRequest::new(request));
        expect_result!(self.forward(request, context).await?, CompleteResult)
    }

    async fn set_level(
        &self,
        request: SetLevelRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let request = ClientRequest::SetLevelRequest(SetLevelRequest::new(request));
        if let Some(gateway) = &self.core.gateway {
            count_request("logging/setLevel");
            self.touch_and_start(&context).await?;
            gateway.set_level_all(request).await;
            return Ok(());
        }
        self.forward_empty(request, context).await
    }

    async fn get_prompt(
        &self,
        request: GetPromptRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetPromptResponse, ErrorData> {
        let request = ClientRequest::GetPromptRequest(GetPromptRequest::new(request));
        match self.forward(request, context).await? {
            ServerResult::InputRequiredResult(r) => Ok(GetPromptResponse::InputRequired(r)),
            other => expect_result!(other, GetPromptResult).map(GetPromptResponse::Complete),
        }
    }

    async fn list_prompts(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListPromptsResult, ErrorData> {
        if let Some(gateway) = &self.core.gateway {
            count_request("prompts/list");
            self.touch_and_start(&context).await?;
            return Ok(gateway.list_prompts().await);
        }
        let request = ClientRequest::ListPromptsRequest(optional(request));
        expect_result!(self.forward(request, context).await?, ListPromptsResult)
    }

    async fn list_resources(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        if let Some(gateway) = &self.core.gateway {
            count_request("resources/list");
            self.touch_and_start(&context).await?;
            return Ok(gateway.list_resources().await);
        }
        let request = ClientRequest::ListResourcesRequest(optional(request));
        expect_result!(self.forward(request, context).await?, ListResourcesResult)
    }

    async fn list_resource_templates(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, ErrorData> {
        if let Some(gateway) = &self.core.gateway {
            count_request("resources/templates/list");
            self.touch_and_start(&context).await?;
            return Ok(gateway.list_resource_templates().await);
        }
        let request = ClientRequest::ListResourceTemplatesRequest(optional(request));
        expect_result!(
            self.forward(request, context).await?,
            ListResourceTemplatesResult
        )
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, ErrorData> {
        let request = ClientRequest::ReadResourceRequest(ReadResourceRequest::new(request));
        match self.forward(request, context).await? {
            ServerResult::InputRequiredResult(r) => Ok(ReadResourceResponse::InputRequired(r)),
            other => expect_result!(other, ReadResourceResult).map(ReadResourceResponse::Complete),
        }
    }

    async fn subscribe(
        &self,
        request: SubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let request = ClientRequest::SubscribeRequest(SubscribeRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn unsubscribe(
        &self,
        request: UnsubscribeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        let request = ClientRequest::UnsubscribeRequest(UnsubscribeRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        metrics::counter!("toolwarden_proxy_requests_total", "method" => "tools/call").increment(1);
        self.touch_and_start(&context).await?;
        let member = self
            .core
            .gateway
            .as_ref()
            .and_then(|gateway| gateway.tool_route(&request.name))
            .map(|(member, _)| member);
        let mut request = ClientRequest::CallToolRequest(CallToolRequest::new(request));
        let (route, _cause) = self.prepare(&mut request, &context, member);
        let session = self.session_key(&context);
        request.extensions_mut().insert(session.clone());
        let call = self.core.call_tool(request);
        let outcome = unless_cancelled(&context.ct, call).await;
        if outcome.is_some() {
            unless_cancelled(&context.ct, route.progress_first()).await;
        }
        match answers::tool_call(outcome)? {
            ServerResult::InputRequiredResult(r) => Ok(CallToolResponse::InputRequired(r)),
            ServerResult::CreateTaskResult(r) => {
                // Its status notifications are this client's only.
                let client = self.session.downstream.get().map(|(id, _)| *id);
                self.core.downstreams.task_created(client, &r.task.task_id);
                if let (Some(gateway), Some(member)) = (&self.core.gateway, member) {
                    gateway.task_created(member, &session, &r.task.task_id);
                }
                Ok(CallToolResponse::Task(r))
            }
            other => expect_result!(other, CallToolResult).map(CallToolResponse::Complete),
        }
    }

    async fn list_tools(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        if let Some(gateway) = &self.core.gateway {
            count_request("tools/list");
            self.touch_and_start(&context).await?;
            return Ok(gateway.list_tools().await);
        }
        let request = ClientRequest::ListToolsRequest(optional(request));
        expect_result!(self.forward(request, context).await?, ListToolsResult)
    }

    async fn on_custom_request(
        &self,
        request: CustomRequest,
        context: RequestContext<RoleServer>,
    ) -> Result<CustomResult, ErrorData> {
        // The task methods rmcp has no model for (2025-11-25's
        // `tasks/result`, `tasks/list`) are another session's business as
        // `tasks/get` is: a task of another session's is unknown here, and
        // is left out of a list.
        let method = request.method.clone();
        if method.starts_with("tasks/") {
            if let Some(task_id) = request
                .params
                .as_ref()
                .and_then(|p| p.get("taskId"))
                .and_then(serde_json::Value::as_str)
            {
                self.check_task_owner(task_id, &context)
                    .inspect_err(|_| count_request(&method))?;
            }
        }
        let result = self
            .forward(ClientRequest::CustomRequest(request), context)
            .await?;
        // Read once the request registered this session's client.
        let me = self.session.downstream.get().map(|(id, _)| *id);
        let mut result = match result {
            ServerResult::CustomResult(r) => r,
            other => serde_json::to_value(&other)
                .map(CustomResult::new)
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?,
        };
        if method == "tasks/list" {
            if let Some(tasks) = result
                .0
                .get_mut("tasks")
                .and_then(serde_json::Value::as_array_mut)
            {
                let downstreams = &self.core.downstreams;
                tasks.retain(|task| {
                    task.get("taskId")
                        .and_then(serde_json::Value::as_str)
                        .is_none_or(|id| !downstreams.task_of_another(id, me))
                });
            }
        }
        Ok(result)
    }

    async fn get_task(
        &self,
        request: GetTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetTaskResult, ErrorData> {
        self.check_task_owner(&request.task_id, &context)
            .inspect_err(|_| count_request("tasks/get"))?;
        let request = ClientRequest::GetTaskRequest(GetTaskRequest::new(request));
        expect_result!(self.forward(request, context).await?, GetTaskResult)
    }

    async fn update_task(
        &self,
        request: UpdateTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.check_task_owner(&request.task_id, &context)
            .inspect_err(|_| count_request("tasks/update"))?;
        let request = ClientRequest::UpdateTaskRequest(UpdateTaskRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn cancel_task(
        &self,
        request: CancelTaskParams,
        context: RequestContext<RoleServer>,
    ) -> Result<(), ErrorData> {
        self.check_task_owner(&request.task_id, &context)
            .inspect_err(|_| count_request("tasks/cancel"))?;
        let request = ClientRequest::CancelTaskRequest(CancelTaskRequest::new(request));
        self.forward_empty(request, context).await
    }

    async fn list_skills(
        &self,
        request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListSkillsResult, ErrorData> {
        let request = ClientRequest::ListSkillsRequest(optional(request));
        expect_result!(self.forward(request, context).await?, ListSkillsResult)
    }

    async fn get_skill(
        &self,
        request: GetSkillRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<GetSkillResult, ErrorData> {
        let request = ClientRequest::GetSkillRequest(GetSkillRequest::new(request));
        expect_result!(self.forward(request, context).await?, GetSkillResult)
    }

    async fn read_resource_directory(
        &self,
        request: ReadResourceDirectoryRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<ReadResourceDirectoryResult, ErrorData> {
        let request =
            ClientRequest::ReadResourceDirectoryRequest(ReadResourceDirectoryRequest::new(request));
        expect_result!(self.forward(request, context).await?, ListResourcesResult)
    }

    async fn on_cancelled(
        &self,
        _notification: CancelledNotificationParam,
        _context: NotificationContext<RoleServer>,
    ) {
        // rmcp cancelled the request's context, which drops the upstream call,
        // which sends notifications/cancelled upstream under the upstream id.
    }

    async fn on_progress(
        &self,
        notification: ProgressNotificationParam,
        mut context: NotificationContext<RoleServer>,
    ) {
        // Progress on a request the server sent us (sampling, elicitation):
        // back to the server under its own token, in the order read. The
        // receipt was put there by the downstream transport; it is dropped
        // once the progress is forwarded (or here, if it goes nowhere), so
        // the client's answer can wait for it. The token is looked up in
        // this client's own routes, where the server's requests to it are
        // routed (another client may use the same token); a client not
        // registered was sent no request, so its progress goes nowhere.
        let receipt = context.extensions.remove::<ProgressReceipt<RoleClient>>();
        let Some((_, routes)) = self.session.downstream.get() else {
            return;
        };
        if let Resolved::To(server, token, mark) =
            routes.resolve(&notification.progress_token).await
        {
            let mut params = notification;
            params.progress_token = token;
            let value = params.progress;
            send_in_turn(receipt, &mark, value, server.notify_progress(params)).await;
        }
    }

    async fn on_initialized(&self, _context: NotificationContext<RoleServer>) {}

    async fn on_roots_list_changed(&self, context: NotificationContext<RoleServer>) {
        let mut notification = ClientNotification::RootsListChangedNotification(
            RootsListChangedNotification::default(),
        );
        *notification.get_meta_mut() = context.meta;
        self.notify_upstream(notification).await;
    }

    async fn on_custom_notification(
        &self,
        notification: CustomNotification,
        context: NotificationContext<RoleServer>,
    ) {
        let mut notification = ClientNotification::CustomNotification(notification);
        *notification.get_meta_mut() = context.meta;
        self.notify_upstream(notification).await;
    }

    /// `server/discover` (2026-07-28): the server's capabilities and
    /// identity, as `initialize` answers them, so the upstream is started
    /// first. Before, a discover that came first was answered from the
    /// proxy's defaults (no capabilities, the proxy's own name).
    ///
    /// The versions offered are those with an `initialize` handshake
    /// when the upstream was initialized with one (as the proxy's upstream
    /// connections are), so that a client that can fall back to the
    /// handshake does: the server's requests (sampling, elicitation,
    /// roots) and its notifications (logging, `list_changed`, resource
    /// updates) reach only clients with a session, and 2026-07-28 has none.
    /// The Python SDK's default client settled on 2026-07-28 through the
    /// proxy, where it talks to the same server with the handshake, and
    /// lost all of them. Requests of a 2026-07-28 client are still served.
    /// With an upstream per session, a client without one is offered only
    /// those versions too: its requests without a session would all be
    /// refused (they have no upstream of their own).
    async fn discover(
        &self,
        context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::DiscoverResult, ErrorData> {
        count_request("server/discover");
        let mut versions = self.supported_protocol_versions().into_owned();
        let started = self.start(&context, false).await.is_ok();
        let info = self.get_info();
        if !started || info.protocol_version.has_initialize() {
            versions.retain(rmcp::model::ProtocolVersion::has_initialize);
        }
        Ok(rmcp::model::DiscoverResult::from_server_info(
            versions, info,
        ))
    }

    fn get_info(&self) -> ServerConfig {
        self.server_config()
    }
}

impl ProxyServer {
    /// `initialize`: starts the upstream (or the gateway's) for this client,
    /// waits for it, and answers with the server's capabilities.
    async fn initialize_session(
        &self,
        request: InitializeRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<InitializeResult, ErrorData> {
        context.peer.set_peer_info(request.clone());
        if let Some(gateway) = &self.core.gateway {
            gateway.start(&upstream_client_config(&request));
            self.touch(&context);
            gateway
                .wait_connected()
                .await
                .map_err(|e| answers::unavailable(&e))?;
            return Ok(self.server_config());
        }
        self.core.upstream.start(upstream_client_config(&request));
        self.touch(&context);
        let limit = self.core.upstream.config().connect_timeout;
        let connection = self
            .core
            .upstream
            .wait_connected(limit)
            .await
            .map_err(|e| answers::unavailable(&e))?;
        if connection.info().is_none() {
            return Err(ErrorData::internal_error(
                "the upstream server sent no initialize result",
                None,
            ));
        }
        Ok(self.server_config())
    }
}
