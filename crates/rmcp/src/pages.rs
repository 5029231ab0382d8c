//! Paginated lists (`tools/list`, `prompts/list`, `resources/list`,
//! `resources/templates/list`) read to the end, within bounds.
//!
//! rmcp's `list_all_*` follow `nextCursor` for as long as the server gives
//! one, keeping every item: a server that pages without end (or in a loop)
//! grows the list until whatever timeout the caller set. These stop at the
//! last page, at [`MAX_LISTED_ITEMS`] items, at [`MAX_LIST_PAGES`] pages,
//! or at a cursor the server gave just before, and say whether they
//! stopped early ([`Listed::cut`]).

use std::future::Future;

use rmcp::model::{Cursor, PaginatedRequestParams, Prompt, Resource, ResourceTemplate, Tool};
use rmcp::service::{Peer, RoleClient, ServiceError};

/// The most items read from one paginated list (the size of a tool catalog,
/// [`toolwarden_core::catalog::MAX_CATALOG_TOOLS`]).
pub const MAX_LISTED_ITEMS: usize = toolwarden_core::catalog::MAX_CATALOG_TOOLS;

/// The most pages read from one paginated list.
pub const MAX_LIST_PAGES: usize = 1_000;

/// A paginated list as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed<T> {
    /// The items, in the server's order, at most [`MAX_LISTED_ITEMS`].
    pub items: Vec<T>,
    /// Whether reading stopped before the server's last page: at a bound,
    /// or at a cursor the server had just given (a loop).
    pub cut: bool,
}

/// Reads a list page by page: `page` asks for the page at the cursor in
/// its params and gives its items and the next cursor. It stops at the
/// last page (no next cursor), at [`MAX_LISTED_ITEMS`] items, at
/// [`MAX_LIST_PAGES`] pages, or at a next cursor equal to the one just
/// asked for (a server paging in a loop); [`Listed::cut`] says whether it
/// stopped before the last page. (rmcp's `list_all_*` follow `nextCursor`
/// for as long as the server gives one, keeping every item.)
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// use toolwarden_rmcp::{read_pages, MAX_LIST_PAGES};
/// // A server that pages without end.
/// let listed = read_pages(|params| async move {
///     let n: u64 = params.cursor.as_deref().map_or(0, |c| c.parse().unwrap());
///     Ok::<_, rmcp::ServiceError>((vec![n], Some((n + 1).to_string())))
/// })
/// .await
/// .unwrap();
/// assert!(listed.cut);
/// assert_eq!(listed.items.len(), MAX_LIST_PAGES);
/// # });
/// ```
pub async fn read_pages<T, E, F, Fut>(mut page: F) -> Result<Listed<T>, E>
where
    F: FnMut(PaginatedRequestParams) -> Fut,
    Fut: Future<Output = Result<(Vec<T>, Option<Cursor>), E>>,
{
    let mut items = Vec::new();
    let mut cursor: Option<Cursor> = None;
    for _ in 0..MAX_LIST_PAGES {
        let (more, next) =
            page(PaginatedRequestParams::default().with_cursor(cursor.clone())).await?;
        let room = MAX_LISTED_ITEMS - items.len();
        let over = more.len() > room;
        items.extend(more.into_iter().take(room));
        match next {
            None if !over => return Ok(Listed { items, cut: false }),
            Some(next)
                if !over && items.len() < MAX_LISTED_ITEMS && cursor.as_ref() != Some(&next) =>
            {
                cursor = Some(next);
            }
            _ => return Ok(Listed { items, cut: true }),
        }
    }
    Ok(Listed { items, cut: true })
}

/// Every tool of the server, within bounds ([`read_pages`]).
pub async fn list_tools(peer: &Peer<RoleClient>) -> Result<Listed<Tool>, ServiceError> {
    read_pages(|params| async move {
        let page = peer.list_tools(Some(params)).await?;
        Ok((page.tools, page.next_cursor))
    })
    .await
}

/// Every prompt of the server, within bounds ([`read_pages`]).
pub async fn list_prompts(peer: &Peer<RoleClient>) -> Result<Listed<Prompt>, ServiceError> {
    read_pages(|params| async move {
        let page = peer.list_prompts(Some(params)).await?;
        Ok((page.prompts, page.next_cursor))
    })
    .await
}

/// Every resource of the server, within bounds ([`read_pages`]).
pub async fn list_resources(peer: &Peer<RoleClient>) -> Result<Listed<Resource>, ServiceError> {
    read_pages(|params| async move {
        let page = peer.list_resources(Some(params)).await?;
        Ok((page.resources, page.next_cursor))
    })
    .await
}

/// Every resource template of the server, within bounds ([`read_pages`]).
pub async fn list_resource_templates(
    peer: &Peer<RoleClient>,
) -> Result<Listed<ResourceTemplate>, ServiceError> {
    read_pages(|params| async move {
        let page = peer.list_resource_templates(Some(params)).await?;
        Ok((page.resource_templates, page.next_cursor))
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pages of `per_page` numbers; the cursor after page `n` is
    /// `next(n)`, `None` past `last`.
    async fn read(
        per_page: usize,
        last: Option<usize>,
        next: impl Fn(usize) -> String,
    ) -> (Listed<usize>, usize) {
        let mut asked = 0;
        let listed = read_pages(|params| {
            asked += 1;
            let n: usize = params.cursor.as_deref().map_or(0, |c| c.parse().unwrap());
            let items: Vec<usize> = (n * per_page..(n + 1) * per_page).collect();
            let cursor = match last {
                Some(last) if n >= last => None,
                _ => Some(next(n)),
            };
            async move { Ok::<_, ServiceError>((items, cursor)) }
        })
        .await
        .unwrap();
        (listed, asked)
    }

    #[tokio::test]
    async fn a_list_that_ends_is_read_whole() {
        let (listed, asked) = read(3, Some(4), |n| (n + 1).to_string()).await;
        assert_eq!(asked, 5);
        assert!(!listed.cut);
        assert_eq!(listed.items, (0..15).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn endless_pages_stop_at_the_item_bound_and_the_page_bound() {
        let (listed, asked) = read(50, None, |n| (n + 1).to_string()).await;
        assert!(listed.cut);
        assert_eq!(listed.items.len(), MAX_LISTED_ITEMS);
        assert_eq!(asked, MAX_LISTED_ITEMS / 50);
        let (listed, asked) = read(1, None, |n| (n + 1).to_string()).await;
        assert!(listed.cut);
        assert_eq!(
            (listed.items.len(), asked),
            (MAX_LIST_PAGES, MAX_LIST_PAGES)
        );
    }

    #[tokio::test]
    async fn a_cursor_given_twice_in_a_row_stops_the_loop() {
        // Page 2 points at itself.
        let (listed, asked) = read(2, None, |n| (n + 1).min(2).to_string()).await;
        assert!(listed.cut);
        assert_eq!(asked, 3, "pages 0, 1 and 2, which points at itself");
        assert_eq!(listed.items, (0..6).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_last_page_past_the_bound_is_cut_to_it() {
        let (listed, _) = read(MAX_LISTED_ITEMS + 7, Some(0), |_| unreachable!()).await;
        assert!(listed.cut);
        assert_eq!(listed.items.len(), MAX_LISTED_ITEMS);
        let (listed, _) = read(MAX_LISTED_ITEMS, Some(0), |_| unreachable!()).await;
        assert!(!listed.cut, "exactly the bound, and the last page");
    }
}
