//! [`AlternativeRanker`]: ranking other tools as alternatives to a failed
//! one, BM25 over the tool catalog's names, titles, descriptions and
//! parameter names.

use std::collections::HashMap;
use std::fmt;

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

/// At most this many bytes of a call's arguments enter a ranking query.
pub const MAX_ARGUMENT_TEXT: usize = 128;

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
    /// Its BM25 score against the query (higher is better, always above 0).
    pub score: f64,
}

#[derive(Debug)]
struct IndexedTool {
    name: String,
    /// Name, title, description and parameter names, as one text.
    text: String,
    /// The number of terms in `text`.
    len: f64,
}

/// A BM25 index of tools (k1 = 1.2, b = 0.75), used to suggest other tools
/// when one fails.
///
/// Each tool is indexed by its name, title, description and parameter names
/// (see [`tokenize`] for how text becomes terms). A query scores every tool
/// sharing at least one term with it; tools with no shared term are never
/// suggested. The index is immutable: build a new one when the catalog
/// changes ([`ToolCatalog::version`] tells when).
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
}

impl AlternativeRanker {
    /// Indexes `tools` (tools with a name seen before replace the earlier one).
    pub fn new<'a>(tools: impl IntoIterator<Item = &'a ToolInfo>) -> Self {
        let mut by_name: HashMap<&str, usize> = HashMap::new();
        let mut indexed: Vec<IndexedTool> = Vec::new();
        for tool in tools {
            let mut text = String::new();
            text.push_str(&tool.name);
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
                text,
                len: 0.0,
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
        AlternativeRanker {
            tools: indexed,
            postings,
            avg_len,
        }
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
    /// indexing order.
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
        let mut terms = tokenize(query);
        terms.sort_unstable();
        terms.dedup();
        let n = self.tools.len() as f64;
        let mut scores = vec![0.0f64; self.tools.len()];
        for term in &terms {
            let Some(posting) = self.postings.get(term) else {
                continue;
            };
            let df = posting.len() as f64;
            let idf = (1.0 + (n - df + 0.5) / (df + 0.5)).ln();
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
            }
        }
        let mut ranked: Vec<(usize, f64)> = scores
            .into_iter()
            .enumerate()
            .filter(|&(_, s)| s > 0.0)
            .collect();
        // Stable sort: ties keep the indexing order.
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
        ranked
            .into_iter()
            .filter_map(|(i, score)| {
                let name = self.tools[i].name.as_str();
                (!skip(name)).then_some(Ranked { name, score })
            })
            .take(limit)
            .collect()
    }

    /// Other tools to suggest when `failed_tool` failed: the best matches of
    /// a query made of the failed tool's own indexed text (name, title,
    /// description, parameter names) and `argument_text` (see
    /// [`argument_text`]), leaving out the failed tool and every tool for
    /// which `skip` says `true` (for example, tools whose circuit is open:
    /// `|tool| circuits.is_open(tool)`). At most `limit`, best first.
    pub fn alternatives(
        &self,
        failed_tool: &str,
        argument_text: &str,
        limit: usize,
        mut skip: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        let mut query = String::with_capacity(256);
        match self.tools.iter().find(|t| t.name == failed_tool) {
            Some(tool) => query.push_str(&tool.text),
            None => query.push_str(failed_tool),
        }
        query.push('\n');
        query.push_str(argument_text);
        self.rank(&query, limit, |name| name == failed_tool || skip(name))
            .into_iter()
            .map(|r| r.name.to_owned())
            .collect()
    }
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
    fn a_later_tool_with_the_same_name_replaces_the_earlier() {
        let tools = [ToolInfo::new("a", "weather"), ToolInfo::new("a", "email")];
        let ranker = AlternativeRanker::new(&tools);
        assert_eq!(ranker.len(), 1);
        assert!(ranker.rank("weather", 3, |_| false).is_empty());
        assert_eq!(ranker.rank("email", 3, |_| false)[0].name, "a");
    }
}
