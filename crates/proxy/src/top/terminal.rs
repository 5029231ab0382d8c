//! The terminal of `toolwarden top`: the alternate screen, keys read as
//! they are typed, and everything restored on the way out.

use std::io::Write as _;

use nix::sys::termios::{self, LocalFlags, SetArg, SpecialCharacterIndices, Termios};
use tokio::io::AsyncReadExt as _;
use tokio::sync::mpsc;

/// The screen while `top` runs: entered by [`Screen::enter`], left (main
/// screen, cursor and terminal settings restored) when dropped.
pub(super) struct Screen {
    /// The settings to restore; `None` when standard input is not a terminal.
    saved: Option<Termios>,
}

impl Screen {
    /// Switches to the alternate screen, hides the cursor, and, when
    /// standard input is a terminal, turns off line buffering and echo
    /// (signals stay on: Ctrl-C is a SIGINT, handled by the caller).
    pub(super) fn enter() -> Screen {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok();
        if let Some(saved) = &saved {
            let mut keys = saved.clone();
            keys.local_flags
                .remove(LocalFlags::ICANON | LocalFlags::ECHO);
            keys.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
            keys.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
            // Not a terminal that takes settings: carry on without.
            let _ = termios::tcsetattr(&stdin, SetArg::TCSANOW, &keys);
        }
        write_out("\x1b[?1049h\x1b[?25l\x1b[H\x1b[2J");
        Screen { saved }
    }

    /// Redraws the screen with `text`: from the top left, each line
    /// cleared to its end, and everything below the text cleared.
    pub(super) fn draw(&self, text: &str) {
        let mut out = String::with_capacity(text.len() + 256);
        out.push_str("\x1b[H");
        for line in text.lines() {
            out.push_str(line);
            out.push_str("\x1b[K\n");
        }
        out.push_str("\x1b[J");
        write_out(&out);
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        write_out("\x1b[?25h\x1b[?1049l");
        if let Some(saved) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, saved);
        }
    }
}

/// Writes to standard output at once; a closed terminal is not an error
/// worth stopping for (the quit keys or a signal end `top`).
fn write_out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// A message when the user asks to quit: `q`, `Q` or Ctrl-C typed (when
/// the terminal does not turn it into a signal), SIGINT or SIGTERM.
pub(super) fn quit_keys() -> mpsc::Receiver<()> {
    let (tx, rx) = mpsc::channel(4);
    let keys = tx.clone();
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        // End of input (not a terminal, or closed): only signals quit.
        while let Ok(n @ 1..) = stdin.read(&mut buf).await {
            if buf[..n].iter().any(|b| matches!(b, b'q' | b'Q' | 0x03)) {
                let _ = keys.send(()).await;
                return;
            }
        }
    });
    tokio::spawn(async move {
        crate::cli::shutdown_signal().await;
        let _ = tx.send(()).await;
    });
    rx
}
