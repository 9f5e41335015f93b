//! Body types and helpers shared by the proxy and admin paths.
//!
//! (Named `body`, not `http`, so it does not shadow the `http` crate.)

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The one body type every response (and every upstream request) uses.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Serialises a JSON value into a body.
pub fn json(value: &serde_json::Value) -> BoxBody {
    full(serde_json::to_vec(value).expect("a serde_json::Value always serialises"))
}

/// The upstream exchange ran past its deadline while the body streamed.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response body did not finish before the deadline")]
pub struct BodyDeadlineExceeded;

/// A long-lived upstream body went quiet for longer than its idle bound.
#[derive(Debug, thiserror::Error)]
#[error("the upstream response body sent nothing for {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

/// A future that resolves when the gateway starts draining.
pub type DrainSignal = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a [`Bounded`] body's timer moves.
enum Bound {
    /// One deadline for the whole body.
    Deadline,
    /// The timer restarts at every frame; draining ends the body.
    IdleGap { gap: Duration, drain: DrainSignal },
}

pin_project! {
    /// An upstream response body that cannot hold a client (and a pooled
    /// connection) forever. Either it must end by a deadline
    /// ([`deadline`](Bounded::deadline), failing with
    /// [`BodyDeadlineExceeded`]), or, for responses meant to stay open,
    /// no gap between two frames may exceed a bound
    /// ([`idle_gap`](Bounded::idle_gap), failing with [`BodyIdleTimeout`])
    /// and the body ends cleanly, after the frame in progress, once the
    /// gateway drains, so a graceful shutdown is not held for its whole
    /// grace period. Either way it ends the body at a trailers frame:
    /// trailers could carry `Set-Cookie` past the header filter, and
    /// Knoq's JSON answers have no use for them.
    pub struct Bounded<B> {
        #[pin]
        inner: B,
        #[pin]
        sleep: Sleep,
        bound: Bound,
    }
}

impl<B> Bounded<B> {
    pub fn deadline(inner: B, deadline: Instant) -> Self {
        Bounded {
            inner,
            sleep: tokio::time::sleep_until(deadline),
            bound: Bound::Deadline,
        }
    }

    pub fn idle_gap(inner: B, gap: Duration, drain: DrainSignal) -> Self {
        Bounded {
            inner,
            sleep: tokio::time::sleep(gap),
            bound: Bound::IdleGap { gap, drain },
        }
    }
}

impl<B> Body for Bounded<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if let Bound::IdleGap { drain, .. } = this.bound {
            if drain.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        if let Poll::Ready(frame) = this.inner.poll_frame(cx) {
            if let Bound::IdleGap { gap, .. } = this.bound {
                this.sleep.as_mut().reset(Instant::now() + *gap);
            }
            return Poll::Ready(match frame {
                Some(Ok(f)) if f.is_trailers() => None,
                other => other.map(|r| r.map_err(Into::into)),
            });
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(match this.bound {
                Bound::Deadline => BodyDeadlineExceeded.into(),
                Bound::IdleGap { gap, .. } => BodyIdleTimeout(*gap).into(),
            }))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What went wrong reading a client's request body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// It grew past `server.max_body`.
    TooLarge,
    /// The client's stream failed (disconnect, bad chunk framing).
    Failed,
}

/// Reads a whole request body, refusing it once it passes `limit` bytes
/// (whatever its `Content-Length` said).
pub async fn read_capped<B>(body: B, limit: u64) -> Result<Bytes, BodyFault>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.is_end_stream() {
        // A GET: nothing to read, no collector to build.
        return Ok(Bytes::new());
    }
    let limited = http_body_util::Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyFault::TooLarge),
        Err(_) => Err(BodyFault::Failed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that never yields a frame, like a stalled upstream.
    struct Stalled;

    impl Body for Stalled {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_body_fails_when_the_inner_body_stalls() {
        let body = Bounded::deadline(Stalled, Instant::now() + Duration::from_secs(5));
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<BodyDeadlineExceeded>());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_body_passes_a_prompt_body_through() {
        let body = Bounded::deadline(
            Full::new(Bytes::from_static(b"{}")),
            Instant::now() + Duration::from_secs(5),
        );
        assert_eq!(body.collect().await.unwrap().to_bytes(), "{}");
    }

    /// A body that yields one chunk per tick of `every`, `left` times, then
    /// ends: a stream that keeps talking.
    struct Ticking {
        every: tokio::time::Interval,
        left: usize,
    }

    impl Ticking {
        fn new(every: Duration, left: usize) -> Self {
            let mut every = tokio::time::interval(every);
            every.reset();
            Ticking { every, left }
        }
    }

    impl Body for Ticking {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.left == 0 {
                return Poll::Ready(None);
            }
            match self.every.poll_tick(cx) {
                Poll::Ready(_) => {
                    self.left -= 1;
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
                }
                Poll::Pending => Poll::Pending,
            }
        }
    }

    fn never_drains() -> DrainSignal {
        Box::pin(std::future::pending())
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gap_outlives_any_single_deadline_while_chunks_keep_coming() {
        // 30 chunks 4 s apart: 120 s in all, each gap under the 5 s bound.
        let body = Bounded::idle_gap(
            Ticking::new(Duration::from_secs(4), 30),
            Duration::from_secs(5),
            never_drains(),
        );
        let start = Instant::now();
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 30);
        assert!(start.elapsed() >= Duration::from_secs(120));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gap_fails_a_body_that_goes_quiet() {
        let body = Bounded::idle_gap(Stalled, Duration::from_secs(5), never_drains());
        let start = Instant::now();
        let err = body.collect().await.unwrap_err();
        assert!(err.is::<BodyIdleTimeout>(), "{err}");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_gap_ends_cleanly_when_draining_begins() {
        let drain = crate::shutdown::Drain::default();
        let body = Bounded::idle_gap(Stalled, Duration::from_secs(3600), Box::pin(drain.begun()));
        let collecting = tokio::spawn(body.collect());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(!collecting.is_finished(), "open until the drain");
        drain.begin();
        let done = tokio::time::timeout(Duration::from_secs(1), collecting)
            .await
            .expect("the body ends promptly once draining begins")
            .unwrap();
        assert!(
            done.is_ok(),
            "a drained stream ends cleanly, not with an error"
        );
    }

    #[tokio::test]
    async fn bodies_are_read_up_to_the_limit_and_refused_past_it() {
        let ok = read_capped(Full::new(Bytes::from_static(b"12345")), 5).await;
        assert_eq!(ok.unwrap(), "12345");
        let big = read_capped(Full::new(Bytes::from_static(b"123456")), 5).await;
        assert_eq!(big.unwrap_err(), BodyFault::TooLarge);
    }
}
