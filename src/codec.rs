//! The protobuf codec of user-rpc's generated services: tonic-prost's, except that a message that
//! does not decode is reported as INVALID_ARGUMENT ("not a valid BatchGetUsersRequest: ...")
//! instead of tonic-prost's INTERNAL: the peer sent bytes that are not the expected message, and
//! nothing failed inside the server. Selected with `codec_path` in `build.rs`.

use std::marker::PhantomData;

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};

/// [`tonic_prost::ProstCodec`] with decode errors as INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct ProstCodec<T, U> {
    inner: tonic_prost::ProstCodec<T, U>,
}

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        Self {
            inner: tonic_prost::ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = InvalidArgumentDecoder<<tonic_prost::ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder {
            inner: self.inner.decoder(),
            _item: PhantomData,
        }
    }
}

/// Wraps a decoder and turns its decode failures into INVALID_ARGUMENT.
#[derive(Debug)]
pub struct InvalidArgumentDecoder<D> {
    inner: D,
    _item: PhantomData<fn() -> D>,
}

impl<D> Decoder for InvalidArgumentDecoder<D>
where
    D: Decoder<Error = Status>,
{
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        self.inner.decode(src).map_err(|status| {
            if status.code() == tonic::Code::Internal {
                let name = std::any::type_name::<D::Item>();
                let short = name.rsplit("::").next().unwrap_or(name);
                Status::invalid_argument(format!(
                    "the message is not a valid {short}: {}",
                    status.message()
                ))
            } else {
                status
            }
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.inner.buffer_settings()
    }
}
