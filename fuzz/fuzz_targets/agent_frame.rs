//! Host↔guest frames: the input, read as a stream of frames until the first
//! error, as `Message` (the RPC port, read by both sides), `SimRequest` and
//! `SimResponse` (the sim port), `Forward` (the forwarding port) and
//! `ControlRequest` (the control socket).
//! A frame that parses re-encodes with `write_frame` and reads back to an
//! equal header and payload, consuming exactly what was written.
#![no_main]

use std::fmt::Debug;

use capsa_agent::protocol::{Forward, Frame, Message, SimRequest, SimResponse, read_frame, write_frame};
use capsa_runtime::control::ControlRequest;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

fn frames<T: Serialize + DeserializeOwned + PartialEq + Debug>(mut input: &[u8]) {
    while let Ok(frame) = read_frame::<T>(&mut input) {
        let mut wire = Vec::new();
        write_frame(&mut wire, &frame.header, &frame.payload)
            .unwrap_or_else(|e| panic!("a frame that was read must write: {e}\n{frame:?}"));
        let mut rest = wire.as_slice();
        let again: Frame<T> =
            read_frame(&mut rest).unwrap_or_else(|e| panic!("a written frame must read back: {e}\n{frame:?}"));
        assert_eq!(again, frame, "a written frame must read back equal");
        assert!(rest.is_empty(), "reading a written frame must consume it exactly");
    }
}

fuzz_target!(|data: &[u8]| {
    frames::<Message>(data);
    frames::<SimRequest>(data);
    frames::<SimResponse>(data);
    frames::<Forward>(data);
    frames::<ControlRequest>(data);
});
