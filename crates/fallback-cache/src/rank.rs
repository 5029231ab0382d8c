//! [`AlternativeRanker`]: ranking other tools as alternatives to a failed
//! one, BM25 over the tool catalog's names, titles, descriptions and
//! parameter names, with a relevance floor and upstream awareness.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};
use toolwarden_core::{ToolCatalog, ToolInfo};

/// BM25 term-frequency saturation.
const K1: f64 = 1.2;
/// BM25 length normalisation.
const B: f64 = 0.75;

/// Words too common to say anything about what a tool does.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "in", "into", "is", "it",
    "its", "of", "on", "or", "that", "the", "this", "to", "with",
];

/// Words that say nothing about what a tool does, as [`tokenize`] spells
/// them (lower case, plurals folded: `always` → `alway`, `does` → `doe`).
/// They still add to a BM25 score (their weight is small where many tools
/// use them), but never to a tool's [relevance](Ranked::relevance): two
/// tools sharing only `get` (`get_weather`, `get_stock_price`) are not
/// alternatives.
#[rustfmt::skip]
const GENERIC_TERMS: &[&str] = &[
    // Tool and protocol vocabulary.
    "tool", "function", "server", "mcp", "api", "request", "response", "call", "result", "return",
    "value", "data", "info", "information", "input", "output", "argument", "arg", "param",
    "parameter", "option", "optional", "default", "required", "true", "false", "null", "string",
    "number", "integer", "boolean", "object", "array", "item", "field", "name", "id", "type",
    // Verbs any tool may use.
    "get", "set", "list", "use", "using", "run", "make", "do", "doe", "give", "given", "provide",
    "provided", "specified", "specify", "based", "include", "including", "perform", "execute",
    "handle", "allow", "let", "try",
    // Filler.
    "new", "current", "all", "any", "some", "one", "two", "alway", "never", "only", "also", "can",
    "will", "may", "should", "must", "if", "when", "then", "than", "not", "no", "yes", "you",
    "your", "we", "our", "us", "which", "who", "what", "how", "has", "have", "was", "were", "been",
    "but", "so", "such", "each", "every", "other", "more", "most", "via", "per", "about", "up",
    "out", "over", "after", "before", "like", "just", "etc", "eg", "ie", "specific", "there",
    "here", "these", "those", "they", "them", "their", "without", "within", "between",
];

/// Whether `term` (as [`tokenize`] returns it) may make a tool relevant.
fn is_informative(term: &str) -> bool {
    !GENERIC_TERMS.contains(&term)
}

/// At most this many bytes of a call's arguments enter a ranking query.
pub const MAX_ARGUMENT_TEXT: usize = 128;

/// Relevance weighs terms by their idf as if the index held at least this
/// many tools. In a small catalog every shared term is "common" (a term
/// shared by the failed tool and one other is in 2 of 2 tools), so raw
/// idf would discount the very terms that make two tools alike; past this
/// size, the catalog's own statistics decide.
const MIN_RELEVANCE_CATALOG: f64 = 16.0;

/// Default [`AlternativeRanker::with_min_relevance`] (and the fallback
/// cache's `min_relevance`): 0.15. See [`Ranked::relevance`].
///
/// Chosen on described catalogs (the fallback-cache tests' fixtures):
/// tools that do the same job in other words (`search_docs` /
/// `web_search` 0.37, `read_file` / `list_directory` 0.51, a weather
/// forecast / a forecast lookup 0.24) are above it; tools that share one
/// incidental word (`send_email` / `create_issue` by `body` 0.14,
/// `search_docs` / `query_database` by `query` 0.11) or only generic words
/// (`get_weather` / `get_stock_price`, 0) are below. Verbose descriptions
/// lower every relevance (more terms to share), so a catalog of long
/// descriptions may want a lower floor.
pub const DEFAULT_MIN_RELEVANCE: f64 = 0.15;

/// Splits `text` into lower-case search terms, as the ranker indexes them.
///
/// Splits on every character that is not a letter or a digit, and inside a
/// word at camelCase boundaries (`getWeather` → `get`, `weather`;
/// `HTTPServer` → `http`, `server`); drops one-character terms and a short
/// list of English stop words; folds simple plurals (`docs` → `doc`,
/// `queries` → `query`).
///
/// ```
/// use toolwarden_fallback_cache::tokenize;
/// assert_eq!(tokenize("search_docs"), ["search", "doc"]);
/// assert_eq!(tokenize("get-weather"), ["get", "weather"]);
/// assert_eq!(tokenize("listHTTPServers for a user"), ["list", "http", "server", "user"]);
/// ```
#[must_use]
pub fn tokenize(text: &str) -> Vec<String> {
    let mut terms = Vec::new();
    for_each_term(text, |t| terms.push(t));
    terms
}

fn for_each_term(text: &str, mut f: impl FnMut(String)) {
    for word in text.split(|c: char| !c.is_alphanumeric()) {
        if word.is_empty() {
            continue;
        }
        let chars: Vec<char> = word.chars().collect();
        let mut start = 0;
        for i in 1..chars.len() {
            let (prev, cur) = (chars[i - 1], chars[i]);
            let lower_to_upper = (prev.is_lowercase() || prev.is_numeric()) && cur.is_uppercase();
            // "HTTPServer": the boundary falls before the last capital of a run.
            let acronym_end = prev.is_uppercase()
                && cur.is_uppercase()
                && chars.get(i + 1).is_some_and(|next| next.is_lowercase());
            if lower_to_upper || acronym_end {
                push_term(&chars[start..i], &mut f);
                start = i;
            }
        }
        push_term(&chars[start..], &mut f);
    }
}

fn push_term(chars: &[char], f: &mut impl FnMut(String)) {
    if chars.len() < 2 {
        return;
    }
    let term: String = chars.iter().flat_map(|c| c.to_lowercase()).collect();
    if STOP_WORDS.contains(&term.as_str()) {
        return;
    }
    f(fold_plural(term));
}

/// `queries` → `query`, `docs` → `doc`; leaves `class`, `status`, `analysis` alone.
fn fold_plural(mut term: String) -> String {
    if term.len() > 4 && term.ends_with("ies") {
        term.truncate(term.len() - 3);
        term.push('y');
    } else if term.len() > 3
        && term.ends_with('s')
        && !(term.ends_with("ss") || term.ends_with("us") || term.ends_with("is"))
    {
        term.pop();
    }
    term
}

/// The text a call's arguments add to a ranking query: each top-level key and
/// each string value (also strings directly inside an array), `_meta` left
/// out, cut at [`MAX_ARGUMENT_TEXT`] bytes on a character boundary.
///
/// ```
/// use serde_json::json;
/// use toolwarden_fallback_cache::argument_text;
/// let args = json!({"query": "tokio timeout", "_meta": {"progressToken": 1}});
/// assert_eq!(argument_text(args.as_object().unwrap()), "query tokio timeout");
/// ```
#[must_use]
pub fn argument_text(arguments: &Map<String, Value>) -> String {
    let mut text = String::new();
    push_argument_text(&mut text, arguments, MAX_ARGUMENT_TEXT);
    text
}

/// Appends [`argument_text`] to `out`, writing at most `budget` bytes.
pub(crate) fn push_argument_text(out: &mut String, arguments: &Map<String, Value>, budget: usize) {
    let limit = out.len() + budget;
    let mut push = |s: &str| -> bool {
        let room = limit.saturating_sub(out.len());
        if room <= 1 {
            return false;
        }
        if !out.is_empty() && !out.ends_with('\n') {
            out.push(' ');
        }
        let room = room - 1;
        if s.len() <= room {
            out.push_str(s);
            true
        } else {
            out.push_str(&s[..floor_char_boundary(s, room)]);
            false
        }
    };
    for (key, value) in arguments {
        if key == "_meta" {
            continue;
        }
        if !push(key) {
            return;
        }
        let more = match value {
            Value::String(s) => push(s),
            Value::Array(items) => items.iter().filter_map(Value::as_str).all(&mut push),
            _ => true,
        };
        if !more {
            return;
        }
    }
}

/// The largest index `<= at` that is a character boundary of `s`.
pub(crate) fn floor_char_boundary(s: &str, at: usize) -> usize {
    if at >= s.len() {
        return s.len();
    }
    (0..=at).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

/// One tool and its score in a ranking.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked<'a> {
    /// The tool name.
    pub name: &'a str,
    /// Its BM25 score against the query (higher is better, always above
    /// 0). Unnormalised: it orders the tools of one query, and means
    /// nothing across queries.
    pub score: f64,
    /// How much the tool and the query have in common, from 0 (nothing
    /// informative) to 1 (the same informative terms): the idf-weighted
    /// overlap of their sets of terms (the Ochiai coefficient),
    ///
    /// ```text
    /// relevance = Σ idf(shared terms) / √(Σ idf(query terms) · Σ idf(tool terms))
    /// ```
    ///
    /// counting only informative terms: terms known to the index and not
    /// in a short list of words that say nothing about what a tool does
    /// (`get`, `list`, `tool`, `return`, `always`, ...). Unlike the score,
    /// it is comparable across queries and catalogs, so a floor on it
    /// ([`AlternativeRanker::with_min_relevance`]) means the same
    /// everywhere: a tool sharing no informative term has relevance 0.
    pub relevance: f64,
    /// The upstream the tool belongs to ([`ToolInfo::upstream`](field@ToolInfo::upstream)).
    pub upstream: Option<&'a str>,
}

#[derive(Debug)]
struct IndexedTool {
    name: String,
    upstream: Option<Arc<str>>,
    /// Name (less its upstream's namespace), title, description and
    /// parameter names, as one text.
    text: String,
    /// The number of terms in `text`.
    len: f64,
    /// Σ idf of its distinct informative terms (see [`Ranked::relevance`]).
    weight: f64,
}

/// A failed call, for [`AlternativeRanker::suggest`].
///
/// ```
/// use toolwarden_fallback_cache::FailedCall;
/// let failed = FailedCall::new("time__get_current_time")
///     .argument_text("timezone Europe/Oslo")
///     .upstream_failed(true);
/// assert_eq!(failed.tool(), "time__get_current_time");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailedCall<'a> {
    tool: &'a str,
    argument_text: &'a str,
    upstream_failed: bool,
}

impl<'a> FailedCall<'a> {
    /// A failed call of `tool`, with no argument text, failed by the tool
    /// (its upstream answered).
    #[must_use]
    pub fn new(tool: &'a str) -> Self {
        FailedCall {
            tool,
            argument_text: "",
            upstream_failed: false,
        }
    }

    /// The text of the call's arguments, added to the query (see
    /// [`argument_text`]). Default: empty.
    #[must_use]
    pub fn argument_text(mut self, argument_text: &'a str) -> Self {
        self.argument_text = argument_text;
        self
    }

    /// Whether the failure is the upstream's own (the fallback cache sets
    /// it for a transport failure or a timeout): then no tool of the failed
    /// tool's upstream is suggested. Default: `false` (the tool failed; its
    /// upstream's other tools are suggested, after every other upstream's).
    #[must_use]
    pub fn upstream_failed(mut self, upstream_failed: bool) -> Self {
        self.upstream_failed = upstream_failed;
        self
    }

    /// The failed tool.
    #[must_use]
    pub fn tool(&self) -> &'a str {
        self.tool
    }
}

/// The part of `name` that says what the tool does: without the leading
/// namespace of its upstream (`time__get_current_time` of upstream `time`
/// → `get_current_time`), so that the tools of one upstream do not match
/// each other by their common prefix. The namespace is stripped when the
/// name starts with the upstream's name followed by a character that is
/// not a letter or a digit (any separator: `__`, `.`, `/`, `-`).
fn name_without_namespace<'n>(name: &'n str, upstream: Option<&str>) -> &'n str {
    let Some(upstream) = upstream.filter(|u| !u.is_empty()) else {
        return name;
    };
    match name.strip_prefix(upstream) {
        Some(rest) if rest.starts_with(|c: char| !c.is_alphanumeric()) => rest,
        _ => name,
    }
}

/// A BM25 index of tools (k1 = 1.2, b = 0.75), used to suggest other tools
/// when one fails.
///
/// Each tool is indexed by its name (less its upstream's namespace), title,
/// description and parameter names (see [`tokenize`] for how text becomes
/// terms). A query scores every tool sharing at least one term with it;
/// tools with no shared term are never suggested, nor are tools whose
/// [relevance](Ranked::relevance) is under the floor
/// ([`with_min_relevance`](Self::with_min_relevance), default
/// [`DEFAULT_MIN_RELEVANCE`]): nothing is better than an unrelated tool.
/// Tools of other upstreams come before those of the failed tool's own
/// ([`suggest`](Self::suggest)). The index is immutable: build a new one
/// when the catalog changes ([`ToolCatalog::version`] tells when).
///
/// It works on its own (give it tools, ask it for the best matches of a
/// text) and is what [`FallbackCacheLayer`](crate::FallbackCacheLayer) uses
/// to fill the `alternatives` of a structured error.
///
/// ```
/// use toolwarden_core::{Circuits, ToolInfo};
/// use toolwarden_fallback_cache::AlternativeRanker;
///
/// let tools = [
///     ToolInfo::new("search_docs", "Search the project documentation for pages matching a query"),
///     ToolInfo::new("web_search", "Search the web for pages matching a query"),
///     ToolInfo::new("send_email", "Send an email message to a recipient"),
/// ];
/// let ranker = AlternativeRanker::new(&tools);
/// let circuits = Circuits::none(); // in a stack: the circuit breaker's view
/// let alternatives =
///     ranker.alternatives("search_docs", "query tokio timeout", 3, |tool| circuits.is_open(tool));
/// assert_eq!(alternatives, ["web_search"]); // send_email shares no word with the failed call
/// ```
#[derive(Debug)]
pub struct AlternativeRanker {
    tools: Vec<IndexedTool>,
    /// Term → (tool index, term frequency).
    postings: HashMap<String, Vec<(u32, u32)>>,
    avg_len: f64,
    min_relevance: f64,
}

impl AlternativeRanker {
    /// Indexes `tools` (tools with a name seen before replace the earlier one).
    pub fn new<'a>(tools: impl IntoIterator<Item = &'a ToolInfo>) -> Self {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut indexed: Vec<IndexedTool> = Vec::new();
        for tool in tools {
            let mut text = String::new();
            text.push_str(name_without_namespace(&tool.name, tool.upstream.as_deref()));
            for part in tool
                .title
                .iter()
                .chain(tool.description.iter())
                .chain(&tool.parameters)
            {
                text.push('\n');
                text.push_str(part);
            }
            let entry = IndexedTool {
                name: tool.name.clone(),
                upstream: tool.upstream.clone(),
                text,
                len: 0.0,
                weight: 0.0,
            };
            match by_name.get(tool.name.as_str()) {
                Some(&i) => indexed[i] = entry,
                None => {
                    by_name.insert(&tool.name, indexed.len());
                    indexed.push(entry);
                }
            }
        }
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut total_len = 0.0;
        for (i, tool) in indexed.iter_mut().enumerate() {
            let mut counts: HashMap<String, u32> = HashMap::new();
            let mut len = 0u32;
            for_each_term(&tool.text, |t| {
                len += 1;
                *counts.entry(t).or_default() += 1;
            });
            tool.len = f64::from(len);
            total_len += tool.len;
            // Index tools by position; u32 is plenty for a tool catalog.
            let doc = u32::try_from(i).unwrap_or(u32::MAX);
            for (term, tf) in counts {
                postings.entry(term).or_default().push((doc, tf));
            }
        }
        let avg_len = if indexed.is_empty() {
            0.0
        } else {
            total_len / indexed.len() as f64
        };
        let n = relevance_catalog_size(indexed.len());
        for (term, posting) in &postings {
            if is_informative(term) {
                let w = idf_of(n, posting.len() as f64);
                for &(doc, _) in posting {
                    if let Some(tool) = indexed.get_mut(doc as usize) {
                        tool.weight += w;
                    }
                }
            }
        }
        AlternativeRanker {
            tools: indexed,
            postings,
            avg_len,
            min_relevance: DEFAULT_MIN_RELEVANCE,
        }
    }

    /// Sets the relevance floor of [`alternatives`](Self::alternatives) and
    /// [`suggest`](Self::suggest): a tool whose
    /// [relevance](Ranked::relevance) to the failed call is under it is
    /// never suggested. `0.0` turns the floor off (any tool sharing a term
    /// may be suggested); values outside `0.0..=1.0` are clamped, and NaN
    /// means the default. Default: [`DEFAULT_MIN_RELEVANCE`] (0.15).
    #[must_use]
    pub fn with_min_relevance(mut self, min_relevance: f64) -> Self {
        self.min_relevance = if min_relevance.is_nan() {
            DEFAULT_MIN_RELEVANCE
        } else {
            min_relevance.clamp(0.0, 1.0)
        };
        self
    }

    /// The relevance floor (see [`with_min_relevance`](Self::with_min_relevance)).
    #[must_use]
    pub fn min_relevance(&self) -> f64 {
        self.min_relevance
    }

    /// Indexes every tool the catalog knows.
    #[must_use]
    pub fn from_catalog(catalog: &ToolCatalog) -> Self {
        Self::new(&catalog.tools())
    }

    /// The number of indexed tools.
    #[must_use]
    pub fn len(&self) -> usize {
        self.tools.len()
    }

    /// Whether no tool is indexed.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tools.is_empty()
    }

    /// The tools that best match `query`, best first, at most `limit`,
    /// leaving out those for which `skip` says `true`. Ties keep the tools'
    /// indexing order. No relevance floor and no upstream rule apply here:
    /// each [`Ranked`] carries its relevance and upstream for the caller to
    /// judge.
    ///
    /// ```
    /// use toolwarden_core::ToolInfo;
    /// use toolwarden_fallback_cache::AlternativeRanker;
    /// let tools = [
    ///     ToolInfo::new("get_weather", "Current weather for a city"),
    ///     ToolInfo::new("get_forecast", "Weather forecast for the next days"),
    /// ];
    /// let ranker = AlternativeRanker::new(&tools);
    /// let ranked = ranker.rank("weather forecast", 5, |_| false);
    /// assert_eq!(ranked[0].name, "get_forecast");
    /// assert_eq!(ranked.len(), 2);
    /// ```
    pub fn rank(
        &self,
        query: &str,
        limit: usize,
        mut skip: impl FnMut(&str) -> bool,
    ) -> Vec<Ranked<'_>> {
        if limit == 0 || self.tools.is_empty() {
            return Vec::new();
        }
        self.ranked(query, None)
            .filter(|r| !skip(r.name))
            .take(limit)
            .collect()
    }

    /// Every tool sharing a term with `query`, best score first (ties keep
    /// the indexing order), with its relevance. With `namespace`, an
    /// upstream: the terms of its name do not make its own tools relevant
    /// (`GitHub` in every description of the `github` upstream's tools
    /// says where they run, not what they do).
    fn ranked(&self, query: &str, namespace: Option<&str>) -> impl Iterator<Item = Ranked<'_>> {
        let namespace_terms = namespace.map(tokenize).unwrap_or_default();
        let mut terms = tokenize(query);
        terms.sort_unstable();
        terms.dedup();
        let n = self.tools.len() as f64;
        let mut scores = vec![0.0f64; self.tools.len()];
        let mut shared = vec![0.0f64; self.tools.len()];
        let n_relevance = relevance_catalog_size(self.tools.len());
        let mut query_weight = 0.0;
        for term in &terms {
            let Some(posting) = self.postings.get(term) else {
                continue;
            };
            let df = posting.len() as f64;
            let idf = idf(n, df);
            let weight = if is_informative(term) {
                idf_of(n_relevance, df)
            } else {
                0.0
            };
            query_weight += weight;
            for &(doc, tf) in posting {
                let Some(tool) = self.tools.get(doc as usize) else {
                    continue;
                };
                let tf = f64::from(tf);
                let norm = if self.avg_len > 0.0 {
                    1.0 - B + B * tool.len / self.avg_len
                } else {
                    1.0
                };
                scores[doc as usize] += idf * tf * (K1 + 1.0) / (tf + K1 * norm);
                let names_own_upstream = namespace.is_some()
                    && tool.upstream.as_deref() == namespace
                    && namespace_terms.contains(term);
                if !names_own_upstream {
                    shared[doc as usize] += weight;
                }
            }
        }
        let mut ranked: Vec<(usize, f64)> = scores
            .into_iter()
            .enumerate()
            .filter(|&(_, s)| s > 0.0)
            .collect();
        // Stable sort: ties keep the indexing order.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked.into_iter().map(move |(i, score)| {
            let tool = &self.tools[i];
            let norm = (query_weight * tool.weight).sqrt();
            let relevance = if norm > 0.0 {
                // Rounding must not lift a tool past 1.
                (shared[i] / norm).min(1.0)
            } else {
                0.0
            };
            Ranked {
                name: tool.name.as_str(),
                score,
                relevance,
                upstream: tool.upstream.as_deref(),
            }
        })
    }

    /// Other tools to suggest when `failed_tool` failed (by itself, not its
    /// upstream): [`suggest`](Self::suggest) for
    /// `FailedCall::new(failed_tool).argument_text(argument_text)`.
    pub fn alternatives(
        &self,
        failed_tool: &str,
        argument_text: &str,
        limit: usize,
        skip: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        self.suggest(
            &FailedCall::new(failed_tool).argument_text(argument_text),
            limit,
            skip,
        )
    }

    /// Other tools to suggest for a failed call, at most `limit`.
    ///
    /// The query is the failed tool's own indexed text (name, title,
    /// description, parameter names; just its name if the index does not
    /// know it) and the call's argument text (see [`argument_text`]). A
    /// tool is suggested only if
    ///
    /// - it is not the failed tool and `skip` says `false` for it (for
    ///   example: its circuit is open, `|tool| circuits.is_open(tool)`);
    /// - its [relevance](Ranked::relevance) reaches the floor
    ///   ([`with_min_relevance`](Self::with_min_relevance));
    /// - when the failure is the upstream's
    ///   ([`FailedCall::upstream_failed`]), it does not belong to the
    ///   failed tool's upstream.
    ///
    /// Tools of other upstreams (or of none) come first, best score first;
    /// then the tools of the failed tool's own upstream, best score first.
    /// The upstream rules apply only when the index knows the failed tool
    /// and its upstream ([`ToolInfo::upstream`](field@ToolInfo::upstream)):
    /// with a single upstream, every tool is ranked by score alone.
    ///
    /// ```
    /// use toolwarden_core::ToolInfo;
    /// use toolwarden_fallback_cache::{AlternativeRanker, FailedCall};
    /// let tools = [
    ///     ToolInfo::new("weather__forecast", "Weather forecast for a city").upstream("weather"),
    ///     ToolInfo::new("weather__forecast_hourly", "Hourly weather forecast for a city").upstream("weather"),
    ///     ToolInfo::new("meteo__forecast", "Forecast of the weather at a place").upstream("meteo"),
    ///     ToolInfo::new("mail__send", "Send an email").upstream("mail"),
    /// ];
    /// let ranker = AlternativeRanker::new(&tools);
    /// let failed = FailedCall::new("weather__forecast");
    /// // The tool failed: another upstream's forecast first, then the same upstream's.
    /// assert_eq!(ranker.suggest(&failed, 3, |_| false), ["meteo__forecast", "weather__forecast_hourly"]);
    /// // The upstream failed: none of its tools.
    /// assert_eq!(ranker.suggest(&failed.upstream_failed(true), 3, |_| false), ["meteo__forecast"]);
    /// ```
    pub fn suggest(
        &self,
        failed: &FailedCall<'_>,
        limit: usize,
        mut skip: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        if limit == 0 || self.tools.is_empty() {
            return Vec::new();
        }
        let failed_tool = self.tools.iter().find(|t| t.name == failed.tool);
        let mut query = String::with_capacity(256);
        match failed_tool {
            Some(tool) => query.push_str(&tool.text),
            None => query.push_str(failed.tool),
        }
        query.push('\n');
        query.push_str(failed.argument_text);
        let failed_upstream = failed_tool.and_then(|t| t.upstream.as_deref());
        let mut others = Vec::new();
        let mut same_upstream = Vec::new();
        for ranked in self.ranked(&query, failed_upstream) {
            if ranked.name == failed.tool || ranked.relevance < self.min_relevance {
                continue;
            }
            let same = failed_upstream.is_some() && ranked.upstream == failed_upstream;
            // Decided before `skip`, which may cost a health lookup.
            if same && (failed.upstream_failed || same_upstream.len() == limit) {
                continue;
            }
            if skip(ranked.name) {
                continue;
            }
            if same {
                same_upstream.push(ranked.name.to_owned());
            } else {
                others.push(ranked.name.to_owned());
                if others.len() == limit {
                    break;
                }
            }
        }
        let room = limit - others.len();
        others.extend(same_upstream.into_iter().take(room));
        others
    }
}

/// BM25's inverse document frequency of a term found in `df` of `n` tools.
fn idf(n: f64, df: f64) -> f64 {
    (1.0 + (n - df + 0.5) / (df + 0.5)).ln()
}

/// The same, under another name where it weighs relevance (see
/// [`MIN_RELEVANCE_CATALOG`]).
fn idf_of(n: f64, df: f64) -> f64 {
    idf(n, df)
}

/// The catalog size relevance weights are computed for.
fn relevance_catalog_size(tools: usize) -> f64 {
    (tools as f64).max(MIN_RELEVANCE_CATALOG)
}

impl fmt::Display for Ranked<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({:.3})", self.name, self.score)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokenizes_identifiers_and_prose() {
        assert_eq!(tokenize("search_docs"), ["search", "doc"]);
        assert_eq!(tokenize("get-weather"), ["get", "weather"]);
        assert_eq!(tokenize("getStockPrice"), ["get", "stock", "price"]);
        assert_eq!(tokenize("HTTPServer"), ["http", "server"]);
        assert_eq!(tokenize("utf8Decode v2"), ["utf8", "decode", "v2"]);
        assert_eq!(tokenize("The queries of a class"), ["query", "class"]);
        assert_eq!(tokenize("  --  _ "), Vec::<String>::new());
        assert_eq!(tokenize("Ünïcode WÖRTER"), ["ünïcode", "wörter"]);
    }

    #[test]
    fn argument_text_is_bounded_and_cut_on_a_char_boundary() {
        let long = "é".repeat(200);
        let args = json!({"a": long, "b": "never reached"});
        let text = argument_text(args.as_object().unwrap());
        assert!(text.len() <= MAX_ARGUMENT_TEXT, "{}", text.len());
        assert!(text.starts_with("a éé"));
        assert!(!text.contains("never"));
        let args = json!({"tags": ["rust", 3, "tokio"], "n": 1});
        let text = argument_text(args.as_object().unwrap());
        let mut words: Vec<&str> = text.split(' ').collect();
        words.sort_unstable();
        assert_eq!(words, ["n", "rust", "tags", "tokio"]);
    }

    #[test]
    fn empty_and_degenerate_indexes_rank_nothing() {
        let empty = AlternativeRanker::new(&[]);
        assert!(empty.is_empty());
        assert!(empty.rank("anything", 3, |_| false).is_empty());
        assert!(empty.alternatives("x", "", 3, |_| false).is_empty());
        let bare = AlternativeRanker::new(&[ToolInfo {
            name: "x".into(),
            ..Default::default()
        }]);
        assert!(bare.rank("", 3, |_| false).is_empty());
        assert!(bare.rank("x", 0, |_| false).is_empty());
    }

    #[test]
    fn rarer_shared_terms_weigh_more() {
        let tools = [
            ToolInfo::new("a", "read the file contents"),
            ToolInfo::new("b", "read the database rows"),
            ToolInfo::new("c", "read the calendar"),
        ];
        let ranker = AlternativeRanker::new(&tools);
        let ranked = ranker.rank("read database", 3, |_| false);
        assert_eq!(ranked[0].name, "b");
        assert!(ranked[0].score > ranked[1].score);
        assert_eq!(ranked.len(), 3, "every tool shares `read`");
        // Among tools sharing only `read`, the shortest description wins.
        assert_eq!(ranker.rank("read database", 3, |n| n == "b")[0].name, "c");
    }

    #[test]
    fn generic_terms_are_spelled_as_the_tokenizer_spells_them() {
        for term in GENERIC_TERMS {
            // A one-letter or stop word would never be looked up; a plural
            // would never match.
            assert_eq!(tokenize(term), [*term], "{term}");
        }
        assert_eq!(tokenize("does always"), ["doe", "alway"]);
        assert!(!is_informative("get") && is_informative("weather"));
    }

    #[test]
    fn relevance_is_zero_for_generic_words_and_one_for_the_same_terms() {
        let tools = [
            ToolInfo::new("get_weather", "Get the current weather for a city"),
            ToolInfo::new("get_stock_price", "Get the latest stock price"),
            ToolInfo::new("city_weather", "Current weather for a city"),
        ];
        let ranker = AlternativeRanker::new(&tools);
        let ranked = ranker.rank("get weather city", 3, |_| false);
        let of = |name: &str| ranked.iter().find(|r| r.name == name).copied().unwrap();
        assert!(of("get_stock_price").score > 0.0);
        assert_eq!(of("get_stock_price").relevance, 0.0, "only `get` shared");
        // `get` and `current` are generic: get_weather and city_weather
        // share every informative term.
        let ranked = ranker.rank("get_weather Get the current weather for a city", 3, |_| {
            false
        });
        let best = ranked.iter().find(|r| r.name == "city_weather").unwrap();
        assert!((best.relevance - 1.0).abs() < 1e-9, "{best:?}");
        for r in &ranked {
            assert!((0.0..=1.0).contains(&r.relevance), "{r:?}");
        }
        // A query of unknown or generic words only relates to nothing.
        let ranked = ranker.rank("get the current", 3, |_| false);
        assert_eq!(ranked.len(), 3);
        assert!(ranked.iter().all(|r| r.relevance == 0.0), "{ranked:?}");
    }

    #[test]
    fn the_floor_is_clamped_and_nan_means_the_default() {
        let ranker = AlternativeRanker::new(&[]);
        assert_eq!(ranker.min_relevance(), DEFAULT_MIN_RELEVANCE);
        let ranker = ranker.with_min_relevance(2.0);
        assert_eq!(ranker.min_relevance(), 1.0);
        let ranker = ranker.with_min_relevance(-1.0);
        assert_eq!(ranker.min_relevance(), 0.0);
        let ranker = ranker.with_min_relevance(f64::NAN);
        assert_eq!(ranker.min_relevance(), DEFAULT_MIN_RELEVANCE);
    }

    #[test]
    fn an_upstreams_namespace_is_not_a_shared_term() {
        assert_eq!(name_without_namespace("gh__search", Some("gh")), "__search");
        assert_eq!(name_without_namespace("gh.search", Some("gh")), ".search");
        assert_eq!(
            name_without_namespace("ghost_read", Some("gh")),
            "ghost_read"
        );
        assert_eq!(name_without_namespace("gh__search", None), "gh__search");
        assert_eq!(name_without_namespace("gh", Some("gh")), "gh");
        // (`GitHub` would not do here: the tokenizer reads `git`, `hub`.)
        let tools = [
            ToolInfo::new("jira__create_issue", "Create an issue in Jira").upstream("jira"),
            ToolInfo::new("jira__search_code", "Search code linked from Jira").upstream("jira"),
            ToolInfo::new("gitlab__search_code", "Search code in GitLab projects")
                .upstream("gitlab"),
        ];
        let ranker = AlternativeRanker::new(&tools);
        // The name's prefix is not indexed...
        let ranked = ranker.rank("jira", 3, |_| false);
        let names: Vec<&str> = ranked.iter().map(|r| r.name).collect();
        assert_eq!(
            names,
            ["jira__create_issue", "jira__search_code"],
            "from descriptions only"
        );
        assert!(ranker
            .rank("gitlab", 3, |_| false)
            .iter()
            .all(|r| r.name != "jira__create_issue"));
        // ... and `Jira` in a description does not make the upstream's own
        // tools alike: only gitlab's search is offered.
        let failed = FailedCall::new("jira__search_code");
        assert_eq!(
            ranker.suggest(&failed, 3, |_| false),
            ["gitlab__search_code"]
        );
        let ranker = AlternativeRanker::new(&tools).with_min_relevance(0.0);
        assert_eq!(
            ranker.suggest(&failed, 3, |_| false),
            ["gitlab__search_code", "jira__create_issue"],
            "without the floor, the same upstream's tool comes last"
        );
    }

    #[test]
    fn an_unknown_failed_tool_is_ranked_by_its_name_without_upstream_rules() {
        let tools = [
            ToolInfo::new("a__weather", "Weather forecast").upstream("a"),
            ToolInfo::new("b__weather", "Weather report").upstream("b"),
        ];
        let ranker = AlternativeRanker::new(&tools);
        let failed = FailedCall::new("c__weather").upstream_failed(true);
        assert_eq!(
            ranker.suggest(&failed, 3, |_| false),
            ["a__weather", "b__weather"]
        );
        assert!(ranker.suggest(&failed, 0, |_| false).is_empty());
        assert_eq!(ranker.suggest(&failed, 1, |_| false), ["a__weather"]);
    }

    #[test]
    fn a_later_tool_with_the_same_name_replaces_the_earlier() {
        let tools = [ToolInfo::new("a", "weather"), ToolInfo::new("a", "email")];
        let ranker = AlternativeRanker::new(&tools);
        assert_eq!(ranker.len(), 1);
        assert!(ranker.rank("weather", 3, |_| false).is_empty());
        assert_eq!(ranker.rank("email", 3, |_| false)[0].name, "a");
    }
}
