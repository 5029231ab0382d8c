//! What a gateway answers itself: the merged lists, and where each other
//! request goes (see the [module docs](super)).

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use rmcp::model::{
    ClientNotification, ClientRequest, Cursor, ErrorData, ListPromptsResult,
    ListResourceTemplatesResult, ListResourcesResult, ListToolsResult, PaginatedRequestParams,
    Prompt, Reference, Resource, ResourceTemplate, ServerResult, Tool,
};
use toolwarden_core::BoxError;
use tower::ServiceExt as _;

use super::{lock, Gateway, Member, MAX_RESOURCE_ROUTES};
use crate::config::OpenUpstreams;

/// A list request for one page.
fn paged<M: Default>(
    params: PaginatedRequestParams,
) -> rmcp::model::RequestOptionalParam<M, PaginatedRequestParams> {
    rmcp::model::RequestOptionalParam {
        method: M::default(),
        params: Some(params),
        extensions: Default::default(),
    }
}

/// What the description of a tool of an unavailable upstream starts with
/// (`gateway.open_upstreams = "mark"`).
pub const UNAVAILABLE_MARK: &str = "[unavailable]";

impl Gateway {
    /// Asks every connected upstream for a list (all its pages, within the
    /// bounds of [`toolwarden_rmcp::read_pages`]: a list cut short is
    /// logged): each page a request `page` makes, through the upstream's
    /// own quota, breaker and `attempt_timeout` as every request to it
    /// (they were sent past them: a hung upstream held every `tools/list`
    /// for `limits.request_timeout` and its breaker never heard of it), and
    /// `items` reads its answer. The whole is bounded by
    /// `limits.request_timeout`; an upstream that fails, refuses or is too
    /// slow is left out of this answer (and logged).
    async fn gather<'a, T, W>(
        &'a self,
        what: &str,
        wanted: W,
        page: impl Fn(PaginatedRequestParams) -> ClientRequest + Copy,
        items: impl Fn(ServerResult) -> Option<(Vec<T>, Option<Cursor>)> + Copy,
    ) -> Vec<(&'a Member, Vec<T>)>
    where
        W: Fn(&Member) -> bool,
    {
        let limit = self.request_timeout;
        let asks = self.members.iter().filter(|m| wanted(m)).filter_map(|member| {
            member.upstream.connection()?;
            let service = member.service().clone();
            let call = toolwarden_rmcp::read_pages(move |params| {
                let answer = service.clone().oneshot(page(params));
                async move {
                    items(answer.await?).ok_or_else(|| {
                        BoxError::from(format!("{what}: an answer of another kind"))
                    })
                }
            });
            Some(async move {
                match tokio::time::timeout(limit, call).await {
                    Ok(Ok(listed)) => {
                        if listed.cut {
                            tracing::warn!(
                                upstream = %member.name,
                                items = listed.items.len(),
                                "{what}: the server's pages did not end within the bounds; the rest is left out"
                            );
                        }
                        Some((member, listed.items))
                    }
                    Ok(Err(error)) => {
                        let error = member
                            .upstream
                            .redactor()
                            .scrub(&error.to_string())
                            .into_owned();
                        tracing::warn!(upstream = %member.name, %error, "{what} failed; left out");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(upstream = %member.name, "{what} timed out; left out");
                        None
                    }
                }
            })
        });
        futures::future::join_all(asks)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Every upstream's exposed tools, prefixed, filtered and aliased; an
    /// unavailable upstream's hidden or marked (`gateway.open_upstreams`).
    pub(crate) async fn list_tools(&self) -> ListToolsResult {
        let mark = self.open_upstreams == OpenUpstreams::Mark;
        let lists = self
            .gather(
                "tools/list",
                |member| mark || member.is_available(),
                |params| ClientRequest::ListToolsRequest(paged(params)),
                |answer| match answer {
                    ServerResult::ListToolsResult(page) => Some((page.tools, page.next_cursor)),
                    _ => None,
                },
            )
            .await;
        let mut listed: Vec<&str> = Vec::new();
        let mut tools = Vec::new();
        // A name once: a server may list a tool twice, and a client's list
        // is keyed by name.
        let mut names = std::collections::HashSet::new();
        for (member, list) in lists {
            let json = serde_json::json!({ "tools": list });
            member.catalog.fill_from_tools_list(&json);
            let available = member.is_available();
            listed.push(&member.name);
            for mut tool in list {
                let Some(exposed) = member.names.exposed(&tool.name) else {
                    continue;
                };
                if !names.insert(exposed.clone()) {
                    tracing::debug!(upstream = %member.name, tool = %exposed, "a tool listed twice; listed once");
                    continue;
                }
                tool.name = Cow::Owned(exposed);
                if !available {
                    mark_unavailable(&mut tool);
                }
                tools.push(tool);
            }
        }
        if mark {
            // Upstreams down: their tools as last known, marked.
            for member in self.members.iter().filter(|m| !listed.contains(&&*m.name)) {
                for info in member.catalog.tools() {
                    let Some(exposed) = member.names.exposed(&info.name) else {
                        continue;
                    };
                    if !names.insert(exposed.clone()) {
                        continue;
                    }
                    let mut tool = Tool::new(
                        exposed,
                        info.description.unwrap_or_default(),
                        Arc::new(serde_json::Map::new()),
                    );
                    mark_unavailable(&mut tool);
                    tools.push(tool);
                }
            }
        }
        self.sync_catalog();
        ListToolsResult::with_all_items(tools)
    }

    /// Every available upstream's prompts, prefixed.
    pub(crate) async fn list_prompts(&self) -> ListPromptsResult {
        let lists = self
            .gather(
                "prompts/list",
                |member| member.is_available() && has(member, |c| c.prompts.is_some()),
                |params| ClientRequest::ListPromptsRequest(paged(params)),
                |answer| match answer {
                    ServerResult::ListPromptsResult(page) => Some((page.prompts, page.next_cursor)),
                    _ => None,
                },
            )
            .await;
        let prompts: Vec<Prompt> = lists
            .into_iter()
            .flat_map(|(member, list)| {
                list.into_iter().map(move |mut prompt| {
                    prompt.name = member.names.prefixed(&prompt.name);
                    prompt
                })
            })
            .collect();
        ListPromptsResult::with_all_items(prompts)
    }

    /// Every available upstream's resources, their names prefixed (URIs as
    /// the server gave them, remembered for routing reads).
    pub(crate) async fn list_resources(&self) -> ListResourcesResult {
        let lists = self
            .gather(
                "resources/list",
                |member| member.is_available() && has(member, |c| c.resources.is_some()),
                |params| ClientRequest::ListResourcesRequest(paged(params)),
                |answer| match answer {
                    ServerResult::ListResourcesResult(page) => {
                        Some((page.resources, page.next_cursor))
                    }
                    _ => None,
                },
            )
            .await;
        let mut resources: Vec<Resource> = Vec::new();
        let mut shared = Vec::new();
        let mut routes = lock(&self.resources);
        for (member, list) in lists {
            let i = self.by_name[&member.name];
            // This upstream's routes are its list's, now: a URI it no
            // longer lists is forgotten, the others' stay.
            routes.uris.retain(|_, m| *m != i);
            for mut resource in list {
                match routes.uris.entry(resource.uri.clone()) {
                    Entry::Vacant(vacant) => {
                        vacant.insert(i);
                    }
                    Entry::Occupied(mut taken) => {
                        let other = *taken.get();
                        if other != i {
                            // Reads of it go to the first of the two.
                            shared.push((resource.uri.clone(), other.min(i), other.max(i)));
                            taken.insert(other.min(i));
                        }
                    }
                }
                resource.name = member.names.prefixed(&resource.name);
                resources.push(resource);
            }
        }
        let changed = std::mem::replace(&mut routes.shared, shared.len()) != shared.len();
        drop(routes);
        if let (Some((uri, first, second)), true) = (shared.first(), changed) {
            tracing::warn!(
                uri = %uri,
                reads_go_to = %self.members[*first].name,
                also_listed_by = %self.members[*second].name,
                more = shared.len() - 1,
                "a resource URI is listed by two upstreams: its reads go to the first"
            );
        }
        ListResourcesResult::with_all_items(resources)
    }

    /// Every available upstream's resource templates, their names prefixed.
    pub(crate) async fn list_resource_templates(&self) -> ListResourceTemplatesResult {
        let lists = self
            .gather(
                "resources/templates/list",
                |member| member.is_available() && has(member, |c| c.resources.is_some()),
                |params| ClientRequest::ListResourceTemplatesRequest(paged(params)),
                |answer| match answer {
                    ServerResult::ListResourceTemplatesResult(page) => {
                        Some((page.resource_templates, page.next_cursor))
                    }
                    _ => None,
                },
            )
            .await;
        let mut templates: Vec<ResourceTemplate> = Vec::new();
        let mut routes = lock(&self.resources);
        for (member, list) in lists {
            let i = self.by_name[&member.name];
            routes.templates.retain(|(_, m)| *m != i);
            for mut template in list {
                let literal = template
                    .uri_template
                    .split('{')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                if routes.templates.len() < MAX_RESOURCE_ROUTES {
                    routes.templates.push((literal, i));
                }
                template.name = member.names.prefixed(&template.name);
                templates.push(template);
            }
        }
        ListResourceTemplatesResult::with_all_items(templates)
    }

    /// The upstream a resource URI belongs to: the one that listed it, else
    /// the one with the longest matching template start, else the only
    /// upstream with resources.
    fn resource_member(&self, uri: &str) -> Result<&Member, ErrorData> {
        let routes = lock(&self.resources);
        if let Some(&i) = routes.uris.get(uri) {
            return Ok(&self.members[i]);
        }
        let by_template = routes
            .templates
            .iter()
            .filter(|(literal, _)| !literal.is_empty() && uri.starts_with(literal.as_str()))
            .max_by_key(|(literal, _)| literal.len());
        if let Some(&(_, i)) = by_template {
            return Ok(&self.members[i]);
        }
        drop(routes);
        let mut with_resources = self
            .members
            .iter()
            .filter(|m| has(m, |c| c.resources.is_some()));
        match (with_resources.next(), with_resources.next()) {
            (Some(only), None) => Ok(only),
            _ => Err(ErrorData::invalid_params(
                format!("unknown resource: {uri} (list the resources or templates first)"),
                None,
            )),
        }
    }

    /// The upstream of a prompt's exposed name, and the name without the
    /// prefix. A prefix alone names no prompt (`a__` reached upstream `a`
    /// as a prompt with an empty name).
    fn prompt_member<'n>(&self, name: &'n str) -> Result<(&Member, &'n str), ErrorData> {
        self.split(name)
            .filter(|(_, rest)| !rest.is_empty())
            .map(|(i, rest)| (&self.members[i], rest))
            .ok_or_else(|| ErrorData::invalid_params(format!("unknown prompt: {name}"), None))
    }

    /// Where a request that is not a list (and not a tool call) goes: its
    /// upstream, the request rewritten to the server's names. `-32602` when
    /// what it names is no upstream's; `-32601` for requests a gateway does
    /// not route.
    pub(crate) fn route(&self, request: &mut ClientRequest) -> Result<&Member, ErrorData> {
        match request {
            ClientRequest::GetPromptRequest(r) => {
                let (member, name) = self.prompt_member(&r.params.name)?;
                r.params.name = name.to_owned();
                Ok(member)
            }
            ClientRequest::ReadResourceRequest(r) => self.resource_member(&r.params.uri),
            #[allow(deprecated)]
            ClientRequest::SubscribeRequest(r) => self.resource_member(&r.params.uri),
            #[allow(deprecated)]
            ClientRequest::UnsubscribeRequest(r) => self.resource_member(&r.params.uri),
            ClientRequest::CompleteRequest(r) => match &mut r.params.r#ref {
                Reference::Prompt(prompt) => {
                    let (member, name) = self.prompt_member(&prompt.name)?;
                    prompt.name = name.to_owned();
                    Ok(member)
                }
                Reference::Resource(template) => self.resource_member(&template.uri),
                _ => Err(ErrorData::invalid_params(
                    "unknown completion reference",
                    None,
                )),
            },
            ClientRequest::GetTaskRequest(r) => self.task_route(&r.params.task_id),
            ClientRequest::UpdateTaskRequest(r) => self.task_route(&r.params.task_id),
            ClientRequest::CancelTaskRequest(r) => self.task_route(&r.params.task_id),
            _ => Err(ErrorData::new(
                rmcp::model::ErrorCode::METHOD_NOT_FOUND,
                "not routed by a gateway of several upstreams",
                None,
            )),
        }
    }

    fn task_route(&self, task_id: &str) -> Result<&Member, ErrorData> {
        self.task_member(task_id)
            .ok_or_else(|| ErrorData::invalid_params(format!("unknown task: {task_id}"), None))
    }

    /// Sends `logging/setLevel` to every connected upstream (through its
    /// breaker); an upstream that refuses it keeps its level.
    pub(crate) async fn set_level_all(&self, request: ClientRequest) {
        let sends = self.members.iter().filter(|m| m.upstream.connection().is_some()).map(|member| {
            let call = member.service.clone().oneshot(request.clone());
            async move {
                if let Err(e) = call.await {
                    tracing::debug!(upstream = %member.name, error = %e, "logging/setLevel failed");
                }
            }
        });
        futures::future::join_all(sends).await;
    }

    /// Sends a client's notification to every connected upstream.
    pub(crate) async fn notify_all(&self, notification: ClientNotification) {
        let sends = self.members.iter().filter_map(|member| {
            let connection = member.upstream.connection()?;
            let notification = notification.clone();
            Some(async move {
                if let Err(e) = connection.client().peer().send_notification(notification).await {
                    tracing::debug!(upstream = %member.name, error = %e, "could not forward a notification");
                }
            })
        });
        futures::future::join_all(sends).await;
    }
}

/// Whether `member`'s server said it has what `check` looks for.
fn has(member: &Member, check: impl Fn(&rmcp::model::ServerCapabilities) -> bool) -> bool {
    member
        .upstream
        .server_info()
        .is_some_and(|info| check(&info.capabilities))
}

fn mark_unavailable(tool: &mut Tool) {
    let description = tool.description.as_deref().unwrap_or_default();
    tool.description = Some(Cow::Owned(format!("{UNAVAILABLE_MARK} {description}")));
}
