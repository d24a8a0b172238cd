//! A request body with a read timeout: nginx's `client_body_timeout`, the longest wait between
//! two reads of a request body.
//!
//! tower-http has a `TimeoutBody`, but it does not pass on the inner body's `size_hint` and
//! `is_end_stream`: behind it, a declared `Content-Length` is invisible, so an oversized body
//! could not be refused before it is read ([`crate::http::read_body`]), and hyper's client
//! would forward every proxied body, even a GET's empty one, with `Transfer-Encoding: chunked`.
//! This one passes both on.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Sleep, sleep};

use crate::http::BoxError;

pin_project_lite::pin_project! {
    /// `B`, failing with [`BodyReadTimeout`] when no frame comes for `timeout` while one is
    /// wanted (the timer runs only while the reader waits).
    pub struct TimeoutBody<B> {
        #[pin]
        body: B,
        #[pin]
        sleep: Option<Sleep>,
        timeout: Duration,
    }
}

impl<B> TimeoutBody<B> {
    /// `body`, read with at most `timeout` between two frames.
    pub fn new(timeout: Duration, body: B) -> Self {
        Self {
            body,
            sleep: None,
            timeout,
        }
    }
}

/// No part of the body arrived within the timeout.
#[derive(Debug, thiserror::Error)]
#[error("no part of the request body arrived within {0:?}")]
pub struct BodyReadTimeout(pub Duration);

impl<B> Body for TimeoutBody<B>
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
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            this.sleep.set(None);
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.sleep.is_none() {
            this.sleep.set(Some(sleep(*this.timeout)));
        }
        if let Some(timer) = this.sleep.as_mut().as_pin_mut() {
            ready!(timer.poll(cx));
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(*this.timeout)))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full, StreamBody};

    #[tokio::test]
    async fn passes_on_length_and_end_and_times_out_a_stalled_body() {
        let full = TimeoutBody::new(Duration::from_secs(1), Full::new(bytes::Bytes::from("abc")));
        assert_eq!(full.size_hint().exact(), Some(3));
        assert!(!full.is_end_stream());
        let empty = TimeoutBody::new(
            Duration::from_secs(1),
            http_body_util::Empty::<bytes::Bytes>::new(),
        );
        assert!(empty.is_end_stream());
        assert_eq!(full.collect().await.unwrap().to_bytes(), "abc");

        let never = futures_util::stream::pending::<Result<Frame<bytes::Bytes>, std::io::Error>>();
        let stalled = TimeoutBody::new(Duration::from_millis(50), StreamBody::new(never));
        let err = stalled.collect().await.expect_err("times out");
        assert!(err.is::<BodyReadTimeout>(), "{err}");
    }
}
