// SPDX-License-Identifier: GPL-2.0-or-later
//! Where each node of a manifest file sits in its text.
//!
//! serde_norway parses the values but, once a value is detached from its
//! document, it no longer knows its line and column. The validator needs the
//! position of any node, named by a path such as `images[3].build.fragments[1]`,
//! so this module replays the file through yaml-rust2's marked event parser
//! and keeps a tree of positions that mirrors the document.

use std::collections::HashMap;
use std::fmt;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// A 1-based line and column in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    /// The start of a file: where problems with no better place are reported.
    pub const START: Pos = Pos { line: 1, column: 1 };
}

/// One step of a path from the document root to a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl Seg {
    pub fn key(key: &str) -> Seg {
        Seg::Key(key.to_owned())
    }
}

/// Formats a path the way users read it: `images[3].build.fragments[1]`.
pub struct DisplayPath<'a>(pub &'a [Seg]);

impl fmt::Display for DisplayPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(key) if i == 0 => write!(f, "{key}")?,
                Seg::Key(key) => write!(f, ".{key}")?,
                Seg::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum NodeKind {
    Scalar,
    Seq(Vec<Node>),
    /// Entries in document order: key text, key position, value.
    Map(Vec<(String, Pos, Node)>),
}

#[derive(Debug, Clone)]
struct Node {
    pos: Pos,
    kind: NodeKind,
}

/// Positions of every node of one YAML document.
#[derive(Debug, Default)]
pub struct PositionIndex {
    root: Option<Node>,
    duplicates: Vec<DuplicateKey>,
}

/// A key given twice in one mapping.
#[derive(Debug, Clone)]
pub struct DuplicateKey {
    pub key: String,
    pub first: Pos,
    pub again: Pos,
}

/// Builds the tree from parser events. Containers under construction sit on
/// a stack; a mapping alternates between expecting a key and a value.
#[derive(Default)]
struct Builder {
    stack: Vec<Partial>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    duplicates: Vec<DuplicateKey>,
}

enum Partial {
    Seq {
        pos: Pos,
        anchor: usize,
        items: Vec<Node>,
    },
    Map {
        pos: Pos,
        anchor: usize,
        entries: Vec<(String, Pos, Node)>,
        pending_key: Option<(String, Pos)>,
    },
}

fn pos_of(mark: Marker) -> Pos {
    // yaml-rust2 counts lines from 1 and columns from 0.
    Pos {
        line: mark.line(),
        column: mark.col() + 1,
    }
}

impl Builder {
    fn finish_node(&mut self, node: Node, anchor: usize, key_text: Option<String>) {
        if anchor != 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                // Only the first document counts: serde_norway refuses files
                // with several, and that error is reported on its own.
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Partial::Seq { items, .. }) => items.push(node),
            Some(Partial::Map {
                entries,
                pending_key,
                ..
            }) => match pending_key.take() {
                Some((key, key_pos)) => {
                    if let Some((_, first, _)) = entries.iter().find(|(k, _, _)| *k == key) {
                        self.duplicates.push(DuplicateKey {
                            key: key.clone(),
                            first: *first,
                            again: key_pos,
                        });
                    }
                    entries.push((key, key_pos, node));
                }
                None => {
                    // A non-scalar key has no text; it can never match a path.
                    *pending_key = Some((key_text.unwrap_or_default(), node.pos));
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let pos = pos_of(mark);
        match event {
            Event::Scalar(text, _, anchor, _) => {
                let node = Node {
                    pos,
                    kind: NodeKind::Scalar,
                };
                self.finish_node(node, anchor, Some(text));
            }
            Event::Alias(anchor) => {
                let node = self.anchors.get(&anchor).cloned().unwrap_or(Node {
                    pos,
                    kind: NodeKind::Scalar,
                });
                // An alias used as a key is looked up by the text it stands
                // for; that is rare enough to treat it as an unnamed key.
                self.finish_node(node, 0, None);
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Partial::Seq {
                pos,
                anchor,
                items: Vec::new(),
            }),
            Event::MappingStart(anchor, _) => self.stack.push(Partial::Map {
                pos,
                anchor,
                entries: Vec::new(),
                pending_key: None,
            }),
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Partial::Seq { pos, anchor, items }) => (
                        Node {
                            pos,
                            kind: NodeKind::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Partial::Map {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => (
                        Node {
                            // yaml-rust2 marks a block mapping at its first
                            // `:`; users see it where its first key starts.
                            pos: entries
                                .first()
                                .map_or(pos, |(_, key_pos, _)| pos.min(*key_pos)),
                            kind: NodeKind::Map(merge_keys(entries)),
                        },
                        anchor,
                    ),
                    None => return,
                };
                self.finish_node(node, anchor, None);
            }
            _ => {}
        }
    }
}

/// Applies YAML merge keys (`<<: *anchor`, `<<: [*a, *b]`) the way
/// serde_norway's `apply_merge` does, so merged fields are found at their
/// anchor's definition: keys written in the mapping win, then earlier
/// merged mappings.
fn merge_keys(entries: Vec<(String, Pos, Node)>) -> Vec<(String, Pos, Node)> {
    let (merges, mut own): (Vec<_>, Vec<_>) =
        entries.into_iter().partition(|(key, _, _)| key == "<<");
    for (_, _, value) in merges {
        let sources = match value.kind {
            NodeKind::Map(entries) => vec![entries],
            NodeKind::Seq(items) => items
                .into_iter()
                .filter_map(|item| match item.kind {
                    NodeKind::Map(entries) => Some(entries),
                    _ => None,
                })
                .collect(),
            NodeKind::Scalar => Vec::new(),
        };
        for entry in sources.into_iter().flatten() {
            if !own.iter().any(|(key, _, _)| *key == entry.0) {
                own.push(entry);
            }
        }
    }
    own
}

/// Where a problem about a path is reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The value at the path (a bad value).
    Value,
    /// The key that introduces the path's last step (a field that should not
    /// be there, or clashes with another).
    Key,
}

impl PositionIndex {
    /// Indexes `text`. A file yaml-rust2 cannot parse yields an index that
    /// only knows the start of the file; the syntax error itself comes from
    /// serde_norway, which is what actually loads the values.
    pub fn new(text: &str) -> PositionIndex {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut builder, true);
        PositionIndex {
            root: builder.root,
            duplicates: builder.duplicates,
        }
    }

    /// Keys given twice in one mapping, in document order.
    pub fn duplicates(&self) -> &[DuplicateKey] {
        &self.duplicates
    }

    /// Position of the node at `path`, or of the deepest node on the way to
    /// it that exists (a missing field is reported at its parent mapping).
    pub fn locate(&self, path: &[Seg], target: Target) -> Pos {
        let Some(mut node) = self.root.as_ref() else {
            return Pos::START;
        };
        let mut best = node.pos;
        for (i, seg) in path.iter().enumerate() {
            let last = i + 1 == path.len();
            let next = match (&node.kind, seg) {
                (NodeKind::Seq(items), Seg::Index(index)) => items.get(*index),
                (NodeKind::Map(entries), Seg::Key(key)) => {
                    match entries.iter().find(|(k, _, _)| k == key) {
                        Some((_, key_pos, _)) if last && target == Target::Key => {
                            return *key_pos;
                        }
                        Some((_, _, value)) => Some(value),
                        None => None,
                    }
                }
                _ => None,
            };
            match next {
                Some(next) => {
                    node = next;
                    best = node.pos;
                }
                None => break,
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_nested_nodes_and_keys() {
        let text = "images:\n  - name: a\n    build:\n      fragments: [x, \"y\"]\n";
        let index = PositionIndex::new(text);
        let path = [
            Seg::key("images"),
            Seg::Index(0),
            Seg::key("build"),
            Seg::key("fragments"),
            Seg::Index(1),
        ];
        assert_eq!(
            index.locate(&path, Target::Value),
            Pos {
                line: 4,
                column: 22
            }
        );
        let key = [Seg::key("images"), Seg::Index(0), Seg::key("build")];
        assert_eq!(index.locate(&key, Target::Key), Pos { line: 3, column: 5 });
        // A missing field falls back to its parent mapping, which starts
        // at its first key.
        let missing = [Seg::key("images"), Seg::Index(0), Seg::key("kind")];
        assert_eq!(
            index.locate(&missing, Target::Value),
            Pos { line: 2, column: 5 }
        );
        // A flow mapping starts at its brace.
        let flow = PositionIndex::new("a: {b: 1}\n");
        assert_eq!(
            flow.locate(&[Seg::key("a")], Target::Value),
            Pos { line: 1, column: 4 }
        );
        assert_eq!(
            DisplayPath(&path).to_string(),
            "images[0].build.fragments[1]"
        );
    }
}
