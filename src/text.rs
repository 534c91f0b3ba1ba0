//! Human-readable text shared by the library's messages and the command line: counts agreeing
//! with their nouns, and the binary units memory sizes are given in.

use std::fmt;

/// Bytes in a MiB and a GiB. Human-readable text gives memory sizes (weights, KV pools, model
/// files, buffers, the bytes a switch moves) in these binary units, and bandwidths in decimal
/// GB/s (bytes / 1e9 per second, as GPU vendors and the benches report them; the traffic a
/// bandwidth is computed from, beside it, in decimal GB). JSON keys carry their unit (`_mib`,
/// `_gbps`) and keep it.
pub const MIB: f64 = (1u64 << 20) as f64;
pub const GIB: f64 = (1u64 << 30) as f64;

/// A count and its noun, agreeing: `plural(1, "request")` is "1 request", `plural(2, "request")`
/// "2 requests" (also 0). For human-readable text only; JSON keys and values never change.
pub fn plural<N: Count>(n: N, noun: &str) -> String {
    plural_with(n, noun, &format!("{noun}s"))
}

/// [`plural`] for a noun whose plural is not its singular + "s":
/// `plural_with(2, "switch", "switches")` is "2 switches".
pub fn plural_with<N: Count>(n: N, one: &str, many: &str) -> String {
    let noun = if n == N::from(1) { one } else { many };
    format!("{n} {noun}")
}

/// A count: any integer type ([`plural`] says "1 x" for one, "n xs" otherwise).
pub trait Count: fmt::Display + PartialEq + From<u8> {}
impl<N: fmt::Display + PartialEq + From<u8>> Count for N {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_agree_with_their_nouns() {
        assert_eq!(plural(1usize, "request"), "1 request");
        assert_eq!(plural(0usize, "request"), "0 requests");
        assert_eq!(plural(2u64, "token"), "2 tokens");
        assert_eq!(plural_with(1usize, "switch", "switches"), "1 switch");
        assert_eq!(plural_with(3usize, "switch", "switches"), "3 switches");
    }
}
